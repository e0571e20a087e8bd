"""HttpFetcher against a real HTTP server on loopback (uvicorn in a thread).

The server is a small Starlette app: ``/file`` is Starlette's own ``FileResponse`` (what the
control plane's bundle route returns, Range support included); ``/blob`` parses Range itself so
a test can make it ignore Range, answer with an error status, lie in ``Content-Range``, or cut the
connection after a number of bytes. It records every Range header it got and counts the body
bytes it sent, so a test can tell what was asked for and what crossed the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

from edgefleet.agent.config import TransferConfig
from edgefleet.agent.transfer import http as http_fetch
from edgefleet.agent.transfer.http import HttpFetcher
from edgefleet.agent.transfer.mqtt_chunks import Cancelled, ChunkFetcher
from edgefleet.control_plane.broker.embedded import free_port
from edgefleet.shared.errors import BundleIntegrityError, ConfigError, TransferError
from edgefleet.shared.wire.chunks import Chunk, ChunkRequest

CHUNK = 4096
BLOB = random.Random(99).randbytes(300_000)  # 74 chunks, the last one 992 bytes
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HEX = DIGEST.removeprefix("sha256:")
CONFIG = TransferConfig(chunk_size_bytes=CHUNK, http_timeout_s=5.0, http_max_retries=2)
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_PIECE = 16 * 1024  # bytes per body write, so a cut can fall mid-stream


class BlobServer:
    """The app's state: what to serve and how to misbehave."""

    def __init__(self, blob: bytes, path: Path) -> None:
        self.app = Starlette(routes=[Route("/blob", self.blob_route), Route("/file", self.file_route)])
        self.reset(blob, path)

    def reset(self, blob: bytes, path: Path) -> None:
        self.blob = blob
        self.path = path
        path.write_bytes(blob)
        self.ranges: list[str | None] = []  # Range header of each request, in order
        self.bytes_sent = 0
        self.honour_range = True
        self.status: int | None = None  # answer every request with this status and no body
        self.cut_after: list[int] = []  # per request, in order: close the connection after N body bytes
        self.content_range_shift = 0  # lie: claim a Content-Range this many bytes off
        self.stall_at: int | None = None  # after this many body bytes, wait for `release` before going on
        self.release = threading.Event()

    async def file_route(self, request: Request) -> Response:
        self.ranges.append(request.headers.get("range"))
        return FileResponse(self.path, media_type="application/octet-stream")

    async def blob_route(self, request: Request) -> Response:
        header = request.headers.get("range")
        self.ranges.append(header)
        if self.status is not None:
            return Response(status_code=self.status)
        start, end, status, headers = 0, len(self.blob), 200, {}
        match = _RANGE.fullmatch(header or "")
        if self.honour_range and match is not None:
            start = int(match[1])
            end = min(len(self.blob), int(match[2]) + 1) if match[2] else len(self.blob)
            shown = start + self.content_range_shift
            headers["content-range"] = f"bytes {shown}-{shown + end - start - 1}/{len(self.blob)}"
            status = 206
        body = self.blob[start:end]
        limit = self.cut_after.pop(0) if self.cut_after else None
        headers["content-length"] = str(len(body))

        async def stream() -> AsyncIterator[bytes]:
            sent = 0
            for i in range(0, len(body), _PIECE):
                piece = body[i : i + _PIECE]
                if limit is not None and sent + len(piece) > limit:
                    piece = piece[: limit - sent]
                    self.bytes_sent += len(piece)
                    yield piece
                    raise ConnectionAbortedError("cut by the test")  # uvicorn drops the connection
                if self.stall_at is not None and sent >= self.stall_at:
                    while not self.release.is_set():
                        await asyncio.sleep(0.01)
                sent += len(piece)
                self.bytes_sent += len(piece)
                yield piece

        return StreamingResponse(stream(), status_code=status, headers=headers)


@pytest.fixture(scope="module")
def running_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BlobServer, str]]:
    state = BlobServer(BLOB, tmp_path_factory.mktemp("http") / "served.bin")
    port = free_port()
    config = uvicorn.Config(state.app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    try:
        yield state, f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def server(running_server: tuple[BlobServer, str], tmp_path: Path) -> tuple[BlobServer, str]:
    state, base = running_server
    state.reset(BLOB, tmp_path / "served.bin")
    return state, base


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_fetch, "RETRY_BACKOFF_S", (0.01,))


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    return tmp_path / "downloads"


def _have(downloads: Path) -> list[int]:
    raw = (downloads / f"{HEX}.have").read_bytes()
    assert int.from_bytes(raw[:4], "big") == CHUNK
    return [int.from_bytes(raw[i : i + 4], "big") for i in range(4, len(raw) - len(raw) % 4, 4)]


def test_a_full_download_is_one_range_request_and_leaves_only_the_bundle(server, downloads: Path) -> None:
    state, base = server
    fetcher = HttpFetcher(downloads, CONFIG)

    path = fetcher.fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())

    assert path == downloads / f"{HEX}.bundle"
    assert path.read_bytes() == BLOB
    assert state.ranges == [f"bytes=0-{len(BLOB) - 1}"]
    assert state.bytes_sent == len(BLOB)
    assert sorted(p.name for p in downloads.iterdir()) == [path.name]


def test_starlette_file_response_ranges_resume_a_partial_download(server, downloads: Path) -> None:
    """The control plane's route is a FileResponse: resume against the real Range implementation."""
    state, base = server
    state.cut_after = [50_000, 0]  # the retry gains nothing: the fetcher gives up (as if it stopped)
    with pytest.raises(TransferError):
        HttpFetcher(downloads, TransferConfig(chunk_size_bytes=CHUNK, http_max_retries=0)).fetch(
            DIGEST, len(BLOB), [f"{base}/blob"], threading.Event()
        )
    have = _have(downloads)
    assert have == list(range(50_000 // CHUNK))

    path = HttpFetcher(downloads, CONFIG).fetch(DIGEST, len(BLOB), [f"{base}/file"], threading.Event())

    assert path.read_bytes() == BLOB
    assert state.ranges[-1] == f"bytes={len(have) * CHUNK}-{len(BLOB) - 1}"


def test_a_cut_connection_is_resumed_at_the_exact_byte_reached(server, downloads: Path) -> None:
    state, base = server
    state.cut_after = [100_000, 70_001]  # the first two responses die mid-chunk
    fetcher = HttpFetcher(downloads, CONFIG)

    path = fetcher.fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())

    assert path.read_bytes() == BLOB
    assert state.ranges == [
        f"bytes=0-{len(BLOB) - 1}",
        f"bytes=100000-{len(BLOB) - 1}",
        f"bytes=170001-{len(BLOB) - 1}",
    ]
    assert state.bytes_sent == len(BLOB)  # not one byte crossed the wire twice
    assert fetcher.stats["retries"] == 2


def test_after_a_restart_the_download_resumes_at_the_first_incomplete_chunk(server, downloads: Path) -> None:
    state, base = server
    state.cut_after = [100_000, 0]  # the retry gains nothing: the fetcher gives up (as if it stopped)
    with pytest.raises(TransferError, match="RemoteProtocolError") as info:
        HttpFetcher(downloads, TransferConfig(chunk_size_bytes=CHUNK, http_max_retries=0)).fetch(
            DIGEST, len(BLOB), [f"{base}/blob"], threading.Event()
        )
    assert info.value.retryable
    assert isinstance(info.value.__cause__, TransferError)
    assert _have(downloads) == list(range(100_000 // CHUNK))  # 24 complete chunks; the 25th was cut

    # A new fetcher on the same directory, as after the agent restarted.
    state.bytes_sent = 0
    resumed_at = (100_000 // CHUNK) * CHUNK
    path = HttpFetcher(downloads, CONFIG).fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())

    assert path.read_bytes() == BLOB
    assert state.ranges[-1] == f"bytes={resumed_at}-{len(BLOB) - 1}"
    assert state.bytes_sent == len(BLOB) - resumed_at  # at most one chunk again, never from zero


def test_a_server_that_ignores_range_is_read_from_the_start_without_damage(server, downloads: Path) -> None:
    state, base = server
    state.honour_range = False
    state.cut_after = [100_000]  # first a cut, so the retry asks for a range the server will ignore
    fetcher = HttpFetcher(downloads, CONFIG)

    path = fetcher.fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())

    assert path.read_bytes() == BLOB
    assert state.ranges == [f"bytes=0-{len(BLOB) - 1}", f"bytes=100000-{len(BLOB) - 1}"]
    assert state.bytes_sent == 100_000 + len(BLOB)  # the second answer was the whole body again
    assert fetcher.stats["bytes_received"] == len(BLOB)  # and only the missing part was written


def test_a_wrong_digest_deletes_everything_and_raises(server, downloads: Path) -> None:
    _, base = server
    wrong = "sha256:" + hashlib.sha256(b"another bundle").hexdigest()

    with pytest.raises(TransferError, match=f"does not hash to {wrong}") as info:
        HttpFetcher(downloads, CONFIG).fetch(wrong, len(BLOB), [f"{base}/blob"], threading.Event())
    assert info.value.retryable
    assert list(downloads.iterdir()) == []


def test_cancel_stops_the_download_and_keeps_its_progress(server, downloads: Path) -> None:
    state, base = server
    cancel = threading.Event()
    state.stall_at = 3 * _PIECE
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            HttpFetcher(downloads, CONFIG).fetch(DIGEST, len(BLOB), [f"{base}/blob"], cancel)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 5
    have = downloads / f"{HEX}.have"
    # The file exists before its 4-byte header is written: wait for the header too.
    while not (have.exists() and have.stat().st_size >= 4 and len(_have(downloads)) == 3 * _PIECE // CHUNK):
        assert time.monotonic() < deadline, "the first bytes never arrived"
        time.sleep(0.01)
    cancel.set()  # a newer desired state arrives mid-download
    state.release.set()
    thread.join(timeout=10)

    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled), outcome
    assert not (downloads / f"{HEX}.bundle").exists()
    kept = _have(downloads)
    assert kept == list(range(3 * _PIECE // CHUNK))

    path = HttpFetcher(downloads, CONFIG).fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())
    assert path.read_bytes() == BLOB
    assert state.ranges[-1] == f"bytes={len(kept) * CHUNK}-{len(BLOB) - 1}"


def test_a_failing_source_is_given_up_for_the_next(server, downloads: Path) -> None:
    state, base = server
    fetcher = HttpFetcher(downloads, CONFIG)

    path = fetcher.fetch(DIGEST, len(BLOB), [f"{base}/missing", f"{base}/blob"], threading.Event())

    assert path.read_bytes() == BLOB
    assert fetcher.stats["requests"] == 2  # a 404 is not retried


def test_a_server_error_is_retried_then_given_up_with_a_transfer_error(server, downloads: Path) -> None:
    state, base = server
    state.status = 503

    with pytest.raises(TransferError, match=r"gave up after 3 attempts without progress: HTTP 503") as info:
        HttpFetcher(downloads, CONFIG).fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())
    assert info.value.retryable
    assert len(state.ranges) == 1 + CONFIG.http_max_retries


def test_a_refused_connection_is_a_retryable_transfer_error_from_httpx(downloads: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/nothing-listens-here"

    with pytest.raises(TransferError, match="no HTTP source delivered") as info:
        HttpFetcher(downloads, CONFIG).fetch(DIGEST, len(BLOB), [url], threading.Event())
    assert info.value.retryable
    root = info.value.__cause__
    while root is not None and not isinstance(root, httpx.HTTPError):
        root = root.__cause__
    assert isinstance(root, httpx.ConnectError)


def test_a_lying_content_range_is_refused_before_anything_is_written(server, downloads: Path) -> None:
    state, base = server
    state.content_range_shift = 10

    with pytest.raises(TransferError, match="asked for bytes 0-299999 of 300000, got 'bytes 10-300009/300000'"):
        HttpFetcher(downloads, CONFIG).fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())
    assert _have(downloads) == []
    assert (downloads / f"{HEX}.partial").read_bytes() == bytes(len(BLOB))


def test_a_bundle_over_the_size_limit_is_refused_before_any_request(server, downloads: Path) -> None:
    state, base = server
    config = TransferConfig(chunk_size_bytes=CHUNK, max_bundle_bytes=len(BLOB) - 1)

    with pytest.raises(BundleIntegrityError, match=f"over max_bundle_bytes {len(BLOB) - 1}"):
        HttpFetcher(downloads, config).fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())
    assert state.ranges == []


def test_the_bandwidth_cap_holds(server, downloads: Path) -> None:
    _, base = server
    config = TransferConfig(chunk_size_bytes=CHUNK, bandwidth_limit_bytes_per_s=400_000)
    started = time.monotonic()

    path = HttpFetcher(downloads, config).fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())

    # 300 kB at 400 kB/s, less the burst (0.25 s worth) the bucket starts with: 0.5 s at least.
    assert 0.45 <= time.monotonic() - started < 3.0
    assert path.read_bytes() == BLOB


def test_a_download_begun_over_mqtt_finishes_over_http_with_only_the_missing_chunks(server, downloads: Path) -> None:
    state, base = server
    cancel = threading.Event()
    served: list[int] = []
    fetcher: ChunkFetcher | None = None

    def answer(request: ChunkRequest) -> None:
        assert fetcher is not None
        for index in request.indices:
            if index % 2 == 0 and index < 40:  # every other chunk of the first 40, then silence
                served.append(index)
                data = BLOB[index * CHUNK : (index + 1) * CHUNK]
                fetcher.on_message(
                    Chunk(bundle_digest=DIGEST, chunk_size=CHUNK, index=index, total_size=len(BLOB), data=data).encode()
                )
        if len(served) >= 20:
            cancel.set()

    fetcher = ChunkFetcher(downloads, TransferConfig(chunk_size_bytes=CHUNK, window_chunks=128), answer)
    with pytest.raises(Cancelled):
        fetcher.fetch(DIGEST, len(BLOB), cancel)
    assert sorted(_have(downloads)) == list(range(0, 40, 2))

    path = HttpFetcher(downloads, CONFIG).fetch(DIGEST, len(BLOB), [f"{base}/blob"], threading.Event())

    assert path.read_bytes() == BLOB
    expected = [f"bytes={i * CHUNK}-{(i + 1) * CHUNK - 1}" for i in range(1, 39, 2)]
    assert state.ranges == [*expected, f"bytes={39 * CHUNK}-{len(BLOB) - 1}"]
    assert state.bytes_sent == len(BLOB) - 20 * CHUNK


def test_sources_are_the_directive_urls_then_the_control_plane_when_preferred(downloads: Path) -> None:
    plain = HttpFetcher(downloads, TransferConfig(http_base_url="http://cp:8700"))
    preferred = HttpFetcher(downloads, TransferConfig(http_base_url="http://cp:8700/", prefer_http=True))

    assert plain.sources(DIGEST) == ()
    assert plain.sources(DIGEST, ("https://cdn/a",)) == ("https://cdn/a",)
    assert preferred.sources(DIGEST, ("https://cdn/a",)) == ("https://cdn/a", f"http://cp:8700/api/v1/bundles/{DIGEST}")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (TransferConfig(prefer_http=True), "prefer_http needs transfer.http_base_url"),
        (TransferConfig(http_base_url="ftp://cp"), "must be an http"),
    ],
)
def test_bad_http_settings_are_config_errors(downloads: Path, config: TransferConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HttpFetcher(downloads, config)


@pytest.mark.parametrize(
    ("url", "sends"),
    [
        ("http://cp:8700/api/v1/bundles/x", True),
        ("http://cp:8700/other/path", True),  # the origin decides, not the path
        ("http://cp:8701/api/v1/bundles/x", False),  # another port is another origin
        ("https://cp:8700/api/v1/bundles/x", False),
        ("https://cdn.example/bundle?signature=abc", False),  # a CDN or presigned URL never sees them
    ],
)
def test_device_credentials_go_to_the_control_planes_origin_only(tmp_path: Path, url: str, sends: bool) -> None:
    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, content=BLOB)

    fetcher = HttpFetcher(
        tmp_path / "downloads",
        TransferConfig(chunk_size_bytes=CHUNK, http_base_url="http://cp:8700"),
        transport=httpx.MockTransport(answer),
        credentials=("pi-01", "s3cret"),
    )
    assert fetcher.fetch(DIGEST, len(BLOB), [url], threading.Event()).read_bytes() == BLOB
    expected = httpx.BasicAuth("pi-01", "s3cret")._auth_header if sends else None
    assert seen == [expected]
