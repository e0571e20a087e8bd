"""Fetching a bundle over HTTP(S) with range requests (httpx), resumable across failures and restarts.

Sources, tried in order: the directive's ``urls``, then the control plane's bundle route
``{transfer.http_base_url}/api/v1/bundles/{digest}`` when ``transfer.prefer_http`` is set. The
reconciler falls back to MQTT chunks when every source fails with a :class:`TransferError`.

Progress is the same pair of files the MQTT path keeps (:class:`agent.transfer.PartialDownload`):
bytes in ``downloads/<hex>.partial`` and the indices of complete chunks in ``<hex>.have``. Each
attempt asks for ``bytes=<first missing>-<end of that run of missing chunks>``, so:

- after a dropped connection, the next attempt continues at the exact byte reached (kept in
  memory); after a restart, at the start of the first chunk not recorded as complete: never from 0;
- a download begun over MQTT finishes over HTTP with only the missing chunks, and the other way round;
- a server that ignores ``Range`` (``200`` and the whole body) is read from the start, and the bytes
  before the wanted offset are skipped, not written;
- a ``206`` whose ``Content-Range`` does not match what was asked, or a body that runs past the
  bundle's size, ends that source before anything wrong is written.

The complete file must hash to the digest from the signed desired state, or it is deleted and a
retryable :class:`~shared.errors.TransferError` is raised (the bytes were wrong on the way, not the
bundle: the reconciler falls back to MQTT, and later tries again from clean); a bundle over
``max_bundle_bytes`` is refused before any request with :class:`~shared.errors.BundleIntegrityError`.
httpx errors become :class:`~shared.errors.TransferError` (retryable). Attempts that gain no byte
count towards ``http_max_retries``; attempts that make progress reset the count, so a slow but
moving download is never given up.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx

from edgefleet.agent.config import TransferConfig
from edgefleet.agent.transfer.bandwidth import BandwidthLimiter
from edgefleet.agent.transfer.mqtt_chunks import Cancelled, PartialDownload, bundle_path
from edgefleet.shared.errors import BundleIntegrityError, ConfigError, TransferError

log = logging.getLogger(__name__)

BUNDLE_ROUTE = "/api/v1/bundles/{digest}"
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds before the 1st, 2nd, ... retry of a source
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_GIVE_UP_STATUS = frozenset({401, 403, 404, 405, 410, 416})  # asking this source again will not help
_RETRY_STATUS = frozenset({408, 425, 429})  # and every 5xx


class _AttemptFailed(TransferError):
    """One request to one source failed; says where it got to and whether the source is worth retrying."""

    code = "http_attempt_failed"

    def __init__(self, message: str, *, position: int, give_up: bool = False) -> None:
        super().__init__(message)
        self.position = position
        self.give_up = give_up


class HttpFetcher:
    """Downloads bundles from HTTP(S) sources into ``downloads_dir``."""

    def __init__(
        self,
        downloads_dir: Path,
        config: TransferConfig,
        *,
        limiter: BandwidthLimiter | None = None,
        transport: httpx.BaseTransport | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        """Create a fetcher.

        Args:
            downloads_dir: Where partial and complete bundles are kept (shared with the ChunkFetcher).
            config: Timeouts, retries, size limit, chunk size (the unit of recorded progress), cap.
            limiter: The device's bandwidth cap (shared with MQTT); default: one from ``config``.
            transport: httpx transport (tests); default: httpx's own.
            credentials: The device's broker user name and password, sent as HTTP Basic to the
                control plane (the origin of ``http_base_url``) only: its bundle route asks for a
                credential, and other sources (a CDN, presigned S3 URLs) must never see them.

        Raises:
            ConfigError: ``http_base_url`` is not an http(s) URL, or ``prefer_http`` is set without it.
        """
        base = config.http_base_url
        if base is not None and not re.match(r"https?://[^/\s]+", base):
            raise ConfigError(f"transfer.http_base_url must be an http(s) URL, got {base!r:.200}")
        if config.prefer_http and base is None:
            raise ConfigError("transfer.prefer_http needs transfer.http_base_url")
        self._dir = downloads_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._config = config
        self._base = base.rstrip("/") if base else None
        self._auth = httpx.BasicAuth(*credentials) if credentials is not None and self._base is not None else None
        self._auth_origin = _origin(self._base) if self._base is not None else None
        self._limiter = limiter or BandwidthLimiter.for_transfer(config)
        self._transport = transport
        self._tls: ssl.SSLContext | None = None  # made once: loading the CA bundle costs 20-90 ms a time
        self.stats = {"requests": 0, "bytes_received": 0, "retries": 0}

    def sources(self, digest: str, urls: Sequence[str] = ()) -> tuple[str, ...]:
        """Where to fetch ``digest`` over HTTP, in order; empty when it should come over MQTT."""
        out = list(urls)
        if self._config.prefer_http and self._base is not None:
            out.append(self._base + BUNDLE_ROUTE.format(digest=digest))
        return tuple(out)

    def fetch(self, digest: str, size: int, urls: Sequence[str], cancel: threading.Event) -> Path:
        """Download ``digest`` (``size`` bytes) from the first of ``urls`` that delivers it.

        Returns:
            The path of the complete, digest-checked bundle.

        Raises:
            TransferError: No source delivered it (retryable; the progress is kept), or the bytes
                do not hash to ``digest`` (retryable; the progress is deleted).
            BundleIntegrityError: ``size`` is over ``max_bundle_bytes``.
            Cancelled: ``cancel`` was set.
        """
        final = bundle_path(self._dir, digest)
        if final.exists():
            return final
        if size > self._config.max_bundle_bytes:
            raise BundleIntegrityError(f"bundle is {size} bytes, over max_bundle_bytes {self._config.max_bundle_bytes}")
        if not urls:
            raise TransferError(f"no HTTP source for {digest}")
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        with httpx.Client(
            timeout=httpx.Timeout(self._config.http_timeout_s),
            verify=self._tls,
            transport=self._transport,
            follow_redirects=True,
            headers={"Accept-Encoding": "identity"},  # byte offsets must be the file's
        ) as client:
            download = PartialDownload(self._dir, digest, size, self._config.chunk_size_bytes)
            try:
                self._fetch_any(client, urls, download, cancel)
            except BaseException:
                download.close()  # the progress stays on disk for the next attempt
                raise
        return download.finish(final)

    def _fetch_any(
        self, client: httpx.Client, urls: Sequence[str], download: PartialDownload, cancel: threading.Event
    ) -> None:
        failures: list[str] = []
        last: TransferError | None = None
        for url in urls:
            try:
                self._fetch_from(client, url, download, cancel)
                return
            except TransferError as exc:
                log.warning("HTTP download of %s from %s failed: %s", download.digest[:19], url, exc)
                failures.append(f"{url}: {exc}")
                last = exc
        raise TransferError(f"no HTTP source delivered {download.digest}: " + "; ".join(failures)) from last

    # -- one source ------------------------------------------------------------------------------

    def _fetch_from(self, client: httpx.Client, url: str, download: PartialDownload, cancel: threading.Event) -> None:
        failures = 0
        reached: int | None = None  # exact byte reached by the previous attempt in this call
        while True:
            runs = download.missing_runs()
            if not runs:
                return
            first, last = runs[0]
            run_start = download.chunk_span(first)[0]
            end = download.chunk_span(last - 1)[1]
            start = reached if reached is not None and run_start <= reached < end else run_start
            if cancel.is_set():
                raise Cancelled("a newer desired state superseded this download")
            try:
                reached = self._get(client, url, download, run_start, start, end, cancel)
                failures = 0
            except _AttemptFailed as exc:
                gained = exc.position > start
                reached = exc.position
                if exc.give_up:
                    raise
                failures = 0 if gained else failures + 1
                if failures > self._config.http_max_retries:
                    raise TransferError(f"gave up after {failures} attempts without progress: {exc}") from exc
                self.stats["retries"] += 1
                delay = RETRY_BACKOFF_S[min(max(failures, 1), len(RETRY_BACKOFF_S)) - 1]
                log.info(
                    "HTTP download from %s interrupted at byte %d (%s); again in %.1f s",
                    url,
                    exc.position,
                    exc,
                    delay,
                )
                if cancel.wait(delay):
                    raise Cancelled("a newer desired state superseded this download") from None

    def _get(
        self,
        client: httpx.Client,
        url: str,
        download: PartialDownload,
        run_start: int,
        start: int,
        end: int,
        cancel: threading.Event,
    ) -> int:
        """One GET of bytes ``[start, end)``; chunks from ``run_start`` on are marked as they complete.

        Returns:
            The offset reached: ``end``, or less when a ``206`` covered only part of the range.

        Raises:
            _AttemptFailed: With the offset reached, and whether to give up on this source.
            Cancelled: ``cancel`` was set.
        """
        size = download.size
        position = start
        mark_next = run_start // download.chunk_size  # next chunk to record once fully written
        self.stats["requests"] += 1
        try:
            auth = self._auth if _origin(url) == self._auth_origin else None
            with client.stream("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}, auth=auth) as response:
                body_start, body_end = _body_span(response, start, end, size)
                offset = body_start  # offset of the next byte of the body
                for block in response.iter_bytes():
                    if not self._limiter.consume(len(block), cancel) or cancel.is_set():
                        raise Cancelled("a newer desired state superseded this download")
                    block_end = offset + len(block)
                    if block_end > body_end:
                        raise _AttemptFailed(
                            f"{url} sent more than the {body_end - body_start} bytes it announced",
                            position=position,
                            give_up=True,
                        )
                    if block_end > position:  # skip what a Range-ignoring server resends before `start`
                        skip = max(0, position - offset)
                        write_end = min(block_end, end)
                        if write_end > position:
                            download.write(position, memoryview(block)[skip : skip + write_end - position])
                            self.stats["bytes_received"] += write_end - position
                            position = write_end
                            while mark_next < download.total and download.chunk_span(mark_next)[1] <= position:
                                download.mark(mark_next)
                                mark_next += 1
                    offset = block_end
                    if position >= end:
                        return position  # a full body from a Range-ignoring server: the rest is not needed
                if offset < body_end:
                    raise _AttemptFailed(f"{url} ended the body at byte {offset} of {body_end}", position=position)
                return position
        except httpx.HTTPError as exc:
            # Timeouts, refused or dropped connections, protocol errors: worth another try.
            raise _AttemptFailed(f"{type(exc).__name__}: {exc}", position=position) from exc


def _body_span(response: httpx.Response, start: int, end: int, size: int) -> tuple[int, int]:
    """Where the response body lies in the bundle, or :class:`_AttemptFailed` if it is unusable."""
    status = response.status_code
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None:
            raise _AttemptFailed("206 without a usable Content-Range", position=start, give_up=True)
        first, last, total = int(match[1]), int(match[2]), match[3]
        if first != start or last >= end or last < first or (total != "*" and int(total) != size):
            raise _AttemptFailed(
                f"asked for bytes {start}-{end - 1} of {size}, got {response.headers['content-range']!r}",
                position=start,
                give_up=True,
            )
        return first, last + 1
    if status == 200:
        # The server ignored Range: the body is the whole bundle, or it is not our bundle.
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != size:
            raise _AttemptFailed(f"the body is {length} bytes, the bundle {size}", position=start, give_up=True)
        return 0, size
    give_up = status in _GIVE_UP_STATUS or not (status >= 500 or status in _RETRY_STATUS)
    raise _AttemptFailed(f"HTTP {status}", position=start, give_up=give_up)


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the port made explicit, to tell whether two URLs share an origin."""
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, parsed.host, port
