"""The SDK turns whatever an HTTP server answers into the one error tree, never a builtin."""

from __future__ import annotations

import httpx
import pytest

from edgefleet.control_plane.client import ApiError, EdgefleetClient
from edgefleet.shared.errors import MessageError, NotFoundError


def _client(status: int, body: bytes, content_type: str = "application/json") -> EdgefleetClient:
    client = EdgefleetClient("http://cp.test", token="t")
    transport = httpx.MockTransport(
        lambda request: httpx.Response(status, content=body, headers={"content-type": content_type})
    )
    client._http = httpx.Client(base_url="http://cp.test", transport=transport)
    return client


@pytest.mark.parametrize("body", [b"[1, 2]", b'"oops"', b"null", b"<html>bad gateway</html>"])
def test_an_error_body_that_is_not_an_object_is_an_api_error(body: bytes) -> None:
    with pytest.raises(ApiError, match="HTTP 502"):
        _client(502, body).info()


def test_a_404_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="no such model"):
        _client(404, b'{"detail": {"message": "no such model"}}').info()


def test_a_success_that_is_not_json_is_a_message_error() -> None:
    with pytest.raises(MessageError, match="not JSON"):
        _client(200, b"<html>a proxy's login page</html>", "text/html").info()
