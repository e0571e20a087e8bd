"""Receiving a model upload: a streaming ``multipart/form-data`` parser with hard limits.

FastAPI's ``UploadFile`` would spool the whole body before the route runs, so a size limit
there comes after the bytes are already on disk. Here the body is parsed as it arrives: the
file part goes straight to a temp file and the upload is refused (413) the moment it passes
``max_file_bytes``; a ``Content-Length`` that is already too large is refused before reading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from edgefleet.shared.errors import MessageError, TooLargeError

FILE_FIELD = "file"


@dataclass(frozen=True, kw_only=True)
class FormLimits:
    """Limits of an upload form besides its file (``ServerSettings.upload_*``)."""

    max_field_bytes: int = 8 * 1024  # bytes, one text field (the description is the longest)
    max_parts_count: int = 16  # parts of the form
    overhead_bytes: int = 256 * 1024  # bytes allowed beyond the file: boundaries, headers, fields


@dataclass
class ReceivedUpload:
    """A parsed upload: the text fields and the file, saved at ``path``.

    ``attachments`` maps each optional file field that was sent to the file name the client gave.
    """

    path: Path
    filename: str = ""
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)
    attachments: dict[str, str] = field(default_factory=dict)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    is_file: bool = False
    sink: BinaryIO | None = None
    size: int = 0
    data: bytearray = field(default_factory=bytearray)


class _FormReader:
    """python-multipart callbacks: text fields in memory, the file part into ``sink``, each
    attachment (an optional file field) into its own sink."""

    def __init__(
        self,
        upload: ReceivedUpload,
        sink: BinaryIO,
        max_file_bytes: int,
        limits: FormLimits,
        attachment_sinks: Mapping[str, BinaryIO],
    ) -> None:
        self._limits = limits
        self._upload = upload
        self._sink = sink
        self._attachment_sinks = attachment_sinks
        self._max_file_bytes = max_file_bytes
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._parts = 0
        self.have_file = False
        self.complete = False

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._limits.max_parts_count:
            raise MessageError(f"the form has more than {self._limits.max_parts_count} parts")
        self._part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition"))
        if b"name" not in options:
            raise MessageError("a form part has no Content-Disposition name")
        self._part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            filename = options[b"filename"].decode("utf-8", "replace")
            self._part.is_file = True
            if self._part.name == FILE_FIELD and not self.have_file:
                self.have_file = True
                self._upload.filename = filename
                self._part.sink = self._sink
            elif self._part.name in self._attachment_sinks and self._part.name not in self._upload.attachments:
                self._upload.attachments[self._part.name] = filename
                self._part.sink = self._attachment_sinks[self._part.name]
            else:
                optional = sorted(self._attachment_sinks)
                also = f", and at most one in each of {optional}" if optional else ""
                raise MessageError(f"send exactly one file, in the form field {FILE_FIELD!r}{also}")
        elif self._part.name == FILE_FIELD or self._part.name in self._attachment_sinks:
            raise MessageError(f"the form field {FILE_FIELD!r} must be a file upload (with a filename)")
        elif self._part.name in self._upload.fields:
            raise MessageError(f"the form field {self._part.name!r} appears twice")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part.sink is not None:
            self._part.size += end - start
            if self._part.sink is self._sink:
                self._upload.size = self._part.size
            if self._part.size > self._max_file_bytes:
                what = "the model file" if self._part.sink is self._sink else f"the file {self._part.name!r}"
                raise TooLargeError(f"{what} is over the {self._max_file_bytes}-byte upload limit")
            self._part.sink.write(data[start:end])
            return
        self._part.data += data[start:end]
        if len(self._part.data) > self._limits.max_field_bytes:
            raise MessageError(f"the form field {self._part.name!r} is over {self._limits.max_field_bytes} bytes")

    def on_part_end(self) -> None:
        if not self._part.is_file:
            try:
                self._upload.fields[self._part.name] = self._part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise MessageError(f"the form field {self._part.name!r} is not UTF-8") from None

    def on_end(self) -> None:
        self.complete = True


async def receive_upload(
    request: Request,
    dest: Path,
    *,
    max_file_bytes: int,
    limits: FormLimits | None = None,
    attachments: Mapping[str, Path] | None = None,
) -> ReceivedUpload:
    """Parse a ``multipart/form-data`` request, writing its file part to ``dest``.

    Args:
        request: The incoming request (its body is consumed).
        dest: Where to write the file; the caller removes it on error.
        max_file_bytes: Largest file accepted.
        limits: The form's other limits (defaults: :class:`FormLimits`).
        attachments: Optional file fields besides the file, each with where to write it (the
            caller removes them); each is bounded by ``max_file_bytes`` too.

    Returns:
        The fields and file details.

    Raises:
        MessageError: Not multipart, malformed, no file part, or odd fields.
        TooLargeError: The file, or the whole body, is over the limit.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise MessageError("send the model as multipart/form-data with a 'file' part and name/version fields")
    limits = limits or FormLimits()
    max_body = max_file_bytes + limits.overhead_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise TooLargeError(f"the upload is {declared} bytes; the limit is {max_file_bytes} bytes for the model file")

    upload = ReceivedUpload(path=dest)
    with dest.open("wb") as sink, contextlib.ExitStack() as stack:
        attachment_sinks = {name: stack.enter_context(path.open("wb")) for name, path in (attachments or {}).items()}
        reader = _FormReader(upload, sink, max_file_bytes, limits, attachment_sinks)
        parser = MultipartParser(
            params[b"boundary"],
            {
                "on_part_begin": reader.on_part_begin,
                "on_header_field": reader.on_header_field,
                "on_header_value": reader.on_header_value,
                "on_header_end": reader.on_header_end,
                "on_headers_finished": reader.on_headers_finished,
                "on_part_data": reader.on_part_data,
                "on_part_end": reader.on_part_end,
                "on_end": reader.on_end,
            },
        )
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_body:
                    raise TooLargeError(f"the upload is over the {max_file_bytes}-byte limit for the model file")
                parser.write(chunk)
            parser.finalize()
        except FormParserError as exc:
            raise MessageError(f"malformed multipart body: {exc}") from exc
    if not reader.complete:
        # python-multipart's finalize() does not check this itself.
        raise MessageError("the multipart body ended before its closing boundary")
    if not reader.have_file:
        raise MessageError(f"the form has no file part named {FILE_FIELD!r}")
    return upload


async def receive_body(request: Request, path: Path, *, max_bytes: int, what: str) -> int:
    """Stream a raw (``application/octet-stream``) body to ``path``, refusing it past ``max_bytes``.

    Args:
        request: The request whose body is read.
        path: Where the bytes go (the caller removes it).
        max_bytes: Largest body accepted.
        what: What the body is, for error messages ("the bundle").

    Returns:
        The number of bytes received.

    Raises:
        TooLargeError: The body passed ``max_bytes`` (reading stopped there).
        MessageError: The body is empty.
    """
    received = 0
    with path.open("wb") as f:
        async for block in request.stream():
            received += len(block)
            if received > max_bytes:
                raise TooLargeError(f"{what} is over the {max_bytes}-byte upload limit")
            f.write(block)
    if received == 0:
        raise MessageError(f"empty body: send {what} bytes as application/octet-stream")
    return received
