"""How errors become HTTP answers: ``{"detail": {"code", "message", "retryable"}}``.

400 bad input, 404 not found, 409 conflict, 413 too large, 422 a body that fails its schema
(the status is each error class's own ``http_status``: :mod:`edgefleet.shared.errors` holds the one map).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from edgefleet.control_plane.api.schemas import ErrorResponse
from edgefleet.shared.errors import EdgefleetError, MessageError


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entry for routes that may answer these error statuses."""
    return {code: {"model": ErrorResponse} for code in codes}


async def edgefleet_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Any :class:`EdgefleetError` as its HTTP status and ``{"detail": exc.to_dict()}``."""
    assert isinstance(exc, EdgefleetError)
    return JSONResponse(status_code=exc.http_status, content={"detail": exc.to_dict()})


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's schema errors in the same ``detail`` shape, with the per-field list added."""
    assert isinstance(exc, RequestValidationError)
    # Never echo the input back: it can be huge (a 200 MB body) or secret (a token).
    errors = [{k: v for k, v in e.items() if k != "input"} for e in jsonable_encoder(exc.errors())]
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    detail = MessageError(f"{where}: {first.get('msg', 'invalid request')}").to_dict()
    detail["code"] = "request_invalid"
    detail["errors"] = errors
    return JSONResponse(status_code=422, content={"detail": detail})


def install_error_handlers(app: FastAPI) -> None:
    """Answer every edgefleet error and schema error in the one ``detail`` shape."""
    app.add_exception_handler(EdgefleetError, edgefleet_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
