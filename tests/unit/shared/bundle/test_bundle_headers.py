"""Tar headers a bundle never carries are refused by their type, before their content is parsed.

Each archive here is what an attacker uploads or sends: the hostile header comes first, before
the envelope, so the refusal happens before any signature could be checked, and it must be a
:class:`BundleError` (a refusal with a code), never a hang or a foreign exception.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import pytest

from edgefleet.shared.bundle import ustar
from edgefleet.shared.bundle.format import ENVELOPE_MEMBER, build_bundle, extract_bundle, make_manifest, verify_bundle
from edgefleet.shared.bundle.manifest import MANIFEST_PAYLOAD_TYPE, FileEntry, Manifest
from edgefleet.shared.errors import MessageError, UnsafeArchiveError
from edgefleet.shared.trust.signing import SigningKey, seal_envelope

KEY = SigningKey.generate()
TRUSTED = {KEY.key_id: KEY.public_key}


def _raw_header(name: str, kind: bytes, size: int, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(fmt)


def _with_payload(header: bytes, payload: bytes) -> bytes:
    return header + payload + ustar.padding(len(payload))


def _pax(payload: bytes) -> bytes:
    return _with_payload(_raw_header("././@PaxHeader", tarfile.XHDTYPE, len(payload)), payload)


def _signed_manifest(tmp_path: Path) -> tuple[Manifest, bytes, Path]:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07" * 100)
    manifest = make_manifest(
        name="m", version="1.0", runtime="onnx", model_file="model.onnx", files={"model.onnx": model},
        inputs=[], outputs=[],
    )
    return manifest, seal_envelope(MANIFEST_PAYLOAD_TYPE, manifest.encode(), [KEY]), model


def _refused(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "hostile.bundle"
    path.write_bytes(data + b"\0" * 1024)
    with pytest.raises(UnsafeArchiveError, match=match):
        verify_bundle(path, trusted_keys=TRUSTED)
    dest = tmp_path / "out" / "slot"
    dest.parent.mkdir(exist_ok=True)
    with pytest.raises(UnsafeArchiveError, match=match):
        extract_bundle(path, dest, trusted_keys=TRUSTED)
    assert list(dest.parent.iterdir()) == []


def test_the_pax_header_redos_is_refused_at_once(tmp_path: Path) -> None:
    # CVE-2024-6232: tarfile's PAX regex is quadratic; 45 KB froze the agent for 5.8 s on 3.11.7.
    started = time.perf_counter()
    _refused(tmp_path, _pax(b"0" * 45_000), "is a PAX extended header")
    assert time.perf_counter() - started < 1.0


def test_nested_pax_headers_are_refused_not_a_recursion_error(tmp_path: Path) -> None:
    _refused(tmp_path, b"".join(_pax(b"") for _ in range(600)), "is a PAX extended header")


def test_a_gnu_sparse_map_that_does_not_parse_is_refused_not_a_value_error(tmp_path: Path) -> None:
    sparse = _pax(b"22 GNU.sparse.map=abc\n28 GNU.sparse.name=files/m\n")
    _refused(tmp_path, sparse + _with_payload(_raw_header("files/m", tarfile.REGTYPE, 3), b"abc"),
             "is a PAX extended header")


@pytest.mark.parametrize(("kind", "what"), [
    (tarfile.XGLTYPE, "PAX global header"),
    (tarfile.GNUTYPE_LONGNAME, "GNU long name"),
    (tarfile.GNUTYPE_LONGLINK, "GNU long link name"),
    (tarfile.GNUTYPE_SPARSE, "GNU sparse file"),
])
def test_every_extended_header_type_is_refused_by_its_flag(tmp_path: Path, kind: bytes, what: str) -> None:
    _refused(tmp_path, _with_payload(_raw_header("x", kind, 3), b"abc"), f"is a {what}")


def test_a_gnu_format_header_is_not_ustar(tmp_path: Path) -> None:
    _, envelope, _ = _signed_manifest(tmp_path)
    header = _raw_header(ENVELOPE_MEMBER, tarfile.REGTYPE, len(envelope), tarfile.GNU_FORMAT)
    _refused(tmp_path, _with_payload(header, envelope), "is not POSIX ustar")


@pytest.mark.parametrize("field", [(124, b"\x80" + b"\0" * 11), (124, b"-0000000001\0"), (148, b"xxxxxx\0 ")])
def test_malformed_numbers_and_checksums_are_refused(tmp_path: Path, field: tuple[int, bytes]) -> None:
    _, envelope, _ = _signed_manifest(tmp_path)
    block = bytearray(ustar.header(ENVELOPE_MEMBER, len(envelope)))
    offset, value = field
    block[offset : offset + len(value)] = value
    if offset != 148:  # keep the checksum right, so the number itself is what is judged
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
    _refused(tmp_path, _with_payload(bytes(block), envelope), "not a valid tar archive")


def test_a_header_cut_short_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.bundle"
    path.write_bytes(ustar.header(ENVELOPE_MEMBER, 10)[:300])
    with pytest.raises(UnsafeArchiveError, match="ends inside a header"):
        verify_bundle(path, trusted_keys=TRUSTED)


def test_what_the_writer_writes_is_plain_ustar_and_tar_can_read_it(tmp_path: Path) -> None:
    manifest, _, model = _signed_manifest(tmp_path)
    path = tmp_path / "b.bundle"
    build_bundle(path, manifest, {"model.onnx": model}, [KEY])
    assert verify_bundle(path, trusted_keys=TRUSTED) == manifest
    with tarfile.open(path) as tar:  # our own bytes: interoperability with other tools
        members = tar.getmembers()
    assert [(m.name, m.type, m.pax_headers) for m in members] == [
        (ENVELOPE_MEMBER, tarfile.REGTYPE, {}), ("files/model.onnx", tarfile.REGTYPE, {})
    ]
    assert path.stat().st_size % ustar.RECORD == 0


def test_long_paths_use_the_ustar_prefix_and_paths_that_do_not_fit_are_refused_in_the_manifest() -> None:
    long_path = "/".join(["d" * 80] * 2) + "/model.onnx"
    prefix, name = ustar.split_name("files/" + long_path) or ("", "")
    assert (prefix, name) == ("files/" + "d" * 80, "d" * 80 + "/model.onnx")
    assert ustar.parse_header(ustar.header("files/" + long_path, 5)) == ustar.Header(
        name="files/" + long_path, size=5, mode=0o644
    )
    too_long = "/".join(["d" * 120] * 3)
    assert ustar.split_name("files/" + too_long) is None
    raw = {"path": too_long, "sha256": "ab" * 32, "size": 1}
    with pytest.raises(MessageError, match="too long for a bundle member name"):
        FileEntry.from_dict(raw)


def test_an_unforeseen_failure_while_reading_is_a_refusal_with_a_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, _, model = _signed_manifest(tmp_path)
    path = tmp_path / "b.bundle"
    build_bundle(path, manifest, {"model.onnx": model}, [KEY])

    def explode(data: bytes) -> Manifest:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(Manifest, "decode", staticmethod(explode))
    with pytest.raises(UnsafeArchiveError, match="RecursionError") as caught:
        verify_bundle(path, trusted_keys=TRUSTED)
    assert caught.value.code == "bundle_unsafe"


def test_an_envelope_cut_short_is_a_cut_archive_not_a_bad_envelope(tmp_path: Path) -> None:
    _, envelope, _ = _signed_manifest(tmp_path)
    path = tmp_path / "cut.bundle"
    path.write_bytes(ustar.header(ENVELOPE_MEMBER, len(envelope)) + envelope[:100])
    with pytest.raises(UnsafeArchiveError, match="a member is cut short"):
        verify_bundle(path, trusted_keys=TRUSTED)
