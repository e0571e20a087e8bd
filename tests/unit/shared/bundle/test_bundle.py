"""Bundles: a signed round trip, and every way a bundle must be refused before it is unpacked.

Malicious archives are hand-crafted with :mod:`tarfile` and carry a *validly signed* manifest,
so each test reaches the archive check it is about rather than stopping at the signature.
"""

from __future__ import annotations

import base64
import io
import json
import random
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefleet.shared.bundle.format import (
    ENVELOPE_MEMBER,
    FILES_PREFIX,
    BundleLimits,
    build_bundle,
    extract_bundle,
    make_manifest,
    sha256_file,
    verify_bundle,
)
from edgefleet.shared.bundle.manifest import MANIFEST_PAYLOAD_TYPE, Manifest
from edgefleet.shared.errors import (
    BundleError,
    BundleIntegrityError,
    ConflictError,
    EdgefleetError,
    MessageError,
    NotFoundError,
    SignatureError,
    UnsafeArchiveError,
)
from edgefleet.shared.tensors import TensorSpec
from edgefleet.shared.trust.signing import SigningKey, seal_envelope
from edgefleet.shared.wire.messages import DESIRED_PAYLOAD_TYPE

# Random, so each file's bytes occur exactly once in the archive (the flip-a-byte test relies on it).
CONTENT = {
    "model.onnx": random.Random(0).randbytes(5000),
    "extra/labels.txt": b"cat\ndog\nbird\n",
    "config.json": b'{"threshold": 0.5}',
}


def trusted(*keys: SigningKey) -> dict[str, Ed25519PublicKey]:
    return {k.key_id: k.public_key for k in keys}


@pytest.fixture
def publisher() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for rel, data in CONTENT.items():
        src = tmp_path / "src" / rel.replace("/", "__")
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        out[rel] = src
    return out


@pytest.fixture
def manifest(sources: dict[str, Path]) -> Manifest:
    return make_manifest(
        name="demo",
        version="1.0.0",
        runtime="onnx",
        model_file="model.onnx",
        files=sources,
        inputs=[TensorSpec(name="x", datatype="FP32", shape=(-1, 4))],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=(-1, 2))],
        labels={"team": "vision"},
    )


@pytest.fixture
def bundle(tmp_path: Path, manifest: Manifest, sources: dict[str, Path], publisher: SigningKey) -> Path:
    path = tmp_path / "demo.bundle"
    build_bundle(path, manifest, sources, [publisher])
    return path


# --- hand-crafted archives ---------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes, *, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def special(name: str, kind: bytes, *, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def envelope_member(envelope: bytes) -> Member:
    return reg(ENVELOPE_MEMBER, envelope)


def sealed(manifest: Manifest, *keys: SigningKey) -> bytes:
    return seal_envelope(MANIFEST_PAYLOAD_TYPE, manifest.encode(), keys)


def file_members(*, skip: Iterable[str] = ()) -> list[Member]:
    return [reg(FILES_PREFIX + rel, data) for rel, data in CONTENT.items() if rel not in set(skip)]


def write_tar(path: Path, members: Iterable[Member]) -> Path:
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def extract_leaves_nothing(
    path: Path,
    tmp_path: Path,
    keys: dict[str, Ed25519PublicKey],
    error: type[EdgefleetError],
    **kwargs: object,
) -> None:
    """Run extract_bundle expecting ``error``; assert it wrote nothing and left no temp dir."""
    dest = tmp_path / "out" / "slot-1"
    dest.parent.mkdir()
    with pytest.raises(error):
        extract_bundle(path, dest, trusted_keys=keys, **kwargs)  # type: ignore[arg-type]
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == [], "extract_bundle left something behind"


# --- the round trip ----------------------------------------------------------------------------


def test_verify_returns_the_signed_manifest(bundle: Path, manifest: Manifest, publisher: SigningKey) -> None:
    assert verify_bundle(bundle, trusted_keys=trusted(publisher)) == manifest


def test_extract_writes_exactly_the_listed_files(
    bundle: Path, manifest: Manifest, publisher: SigningKey, tmp_path: Path
) -> None:
    dest = tmp_path / "models" / "demo" / "slot-1"
    dest.parent.mkdir(parents=True)

    assert extract_bundle(bundle, dest, trusted_keys=trusted(publisher)) == manifest

    written = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert written == CONTENT
    assert sorted(p.name for p in dest.parent.iterdir()) == ["slot-1"]  # no .unpacking left


def test_build_returns_the_files_sha256(
    tmp_path: Path, manifest: Manifest, sources: dict[str, Path], publisher: SigningKey
) -> None:
    path = tmp_path / "a.bundle"
    digest = build_bundle(path, manifest, sources, [publisher])
    assert digest == sha256_file(path)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert not path.with_name("a.bundle.partial").exists()


def test_same_inputs_give_the_same_digest(
    tmp_path: Path, manifest: Manifest, sources: dict[str, Path], publisher: SigningKey
) -> None:
    first = build_bundle(tmp_path / "a.bundle", manifest, sources, [publisher])
    second = build_bundle(tmp_path / "b.bundle", manifest, sources, [publisher])
    assert first == second
    assert (tmp_path / "a.bundle").read_bytes() == (tmp_path / "b.bundle").read_bytes()


def test_extract_refuses_an_existing_destination(bundle: Path, publisher: SigningKey, tmp_path: Path) -> None:
    dest = tmp_path / "slot"
    dest.mkdir()
    with pytest.raises(ConflictError, match="exists already"):
        extract_bundle(bundle, dest, trusted_keys=trusted(publisher))


# --- integrity: content that does not match the signed manifest --------------------------------


def test_one_flipped_byte_is_caught(bundle: Path, publisher: SigningKey, tmp_path: Path) -> None:
    raw = bytearray(bundle.read_bytes())
    at = raw.index(CONTENT["model.onnx"]) + 1234
    raw[at] ^= 0x01
    bundle.write_bytes(bytes(raw))

    with pytest.raises(BundleIntegrityError, match=r"model\.onnx: content does not match the sha256"):
        verify_bundle(bundle, trusted_keys=trusted(publisher))
    extract_leaves_nothing(bundle, tmp_path, trusted(publisher), BundleIntegrityError)


def test_a_missing_file_is_caught(tmp_path: Path, manifest: Manifest, publisher: SigningKey) -> None:
    path = write_tar(
        tmp_path / "b.tar", [envelope_member(sealed(manifest, publisher)), *file_members(skip=["extra/labels.txt"])]
    )
    with pytest.raises(BundleIntegrityError, match=r"lacks file\(s\).*extra/labels\.txt"):
        verify_bundle(path, trusted_keys=trusted(publisher))
    extract_leaves_nothing(path, tmp_path, trusted(publisher), BundleIntegrityError)


def test_an_extra_file_is_caught(tmp_path: Path, manifest: Manifest, publisher: SigningKey) -> None:
    path = write_tar(
        tmp_path / "b.tar",
        [envelope_member(sealed(manifest, publisher)), *file_members(), reg("files/run.sh", b"#!/bin/sh\n")],
    )
    with pytest.raises(BundleIntegrityError, match=r"'run\.sh' is not listed in the signed manifest"):
        verify_bundle(path, trusted_keys=trusted(publisher))
    extract_leaves_nothing(path, tmp_path, trusted(publisher), BundleIntegrityError)


def test_a_file_listed_twice_in_the_archive_is_caught(
    tmp_path: Path, manifest: Manifest, publisher: SigningKey
) -> None:
    path = write_tar(
        tmp_path / "b.tar",
        [envelope_member(sealed(manifest, publisher)), *file_members(), reg("files/config.json", b"{}")],
    )
    with pytest.raises(BundleIntegrityError, match="appears twice"):
        verify_bundle(path, trusted_keys=trusted(publisher))


def test_a_member_of_the_wrong_size_is_caught(tmp_path: Path, manifest: Manifest, publisher: SigningKey) -> None:
    members = file_members(skip=["config.json"]) + [reg("files/config.json", b'{"threshold": 0.9, "x": 1}')]
    path = write_tar(tmp_path / "b.tar", [envelope_member(sealed(manifest, publisher)), *members])
    with pytest.raises(BundleIntegrityError, match=r"config\.json: \d+ bytes, the manifest says 18"):
        verify_bundle(path, trusted_keys=trusted(publisher))


def test_the_envelope_must_come_first(tmp_path: Path, manifest: Manifest, publisher: SigningKey) -> None:
    path = write_tar(tmp_path / "b.tar", [*file_members(), envelope_member(sealed(manifest, publisher))])
    with pytest.raises(BundleIntegrityError, match=f"must start with {ENVELOPE_MEMBER}"):
        verify_bundle(path, trusted_keys=trusted(publisher))
    extract_leaves_nothing(path, tmp_path, trusted(publisher), BundleIntegrityError)


def test_a_signed_but_invalid_manifest_is_an_integrity_error(tmp_path: Path, publisher: SigningKey) -> None:
    envelope = seal_envelope(MANIFEST_PAYLOAD_TYPE, b'{"schema": "edgefleet.manifest/v1"}', [publisher])
    path = write_tar(tmp_path / "b.tar", [envelope_member(envelope), *file_members()])
    with pytest.raises(BundleIntegrityError, match="signed manifest is invalid"):
        verify_bundle(path, trusted_keys=trusted(publisher))


def test_a_file_the_manifest_does_not_list_is_not_found(manifest: Manifest) -> None:
    assert manifest.file(manifest.model_file).path == manifest.model_file
    with pytest.raises(NotFoundError, match="lists no file 'missing.bin'"):
        manifest.file("missing.bin")


def test_an_envelope_that_is_not_json_is_an_integrity_error(tmp_path: Path, publisher: SigningKey) -> None:
    path = write_tar(tmp_path / "b.tar", [envelope_member(b"{not json"), *file_members()])
    with pytest.raises(BundleIntegrityError, match="is not a DSSE envelope: envelope is not JSON") as info:
        verify_bundle(path, trusted_keys=trusted(publisher))
    assert isinstance(info.value.__cause__, MessageError)
    extract_leaves_nothing(path, tmp_path, trusted(publisher), BundleIntegrityError)


# --- signatures --------------------------------------------------------------------------------


def test_signed_by_an_untrusted_key(
    tmp_path: Path, manifest: Manifest, sources: dict[str, Path], publisher: SigningKey
) -> None:
    path = tmp_path / "b.bundle"
    build_bundle(path, manifest, sources, [SigningKey.generate()])
    with pytest.raises(SignatureError, match=r"0 valid signature\(s\) from trusted keys, 1 required"):
        verify_bundle(path, trusted_keys=trusted(publisher))
    extract_leaves_nothing(path, tmp_path, trusted(publisher), SignatureError)


def test_corrupted_signature_bytes(tmp_path: Path, manifest: Manifest, publisher: SigningKey) -> None:
    envelope = json.loads(sealed(manifest, publisher))
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[10] ^= 0x80
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    path = write_tar(tmp_path / "b.tar", [envelope_member(json.dumps(envelope).encode()), *file_members()])

    with pytest.raises(SignatureError, match=r"0 valid signature\(s\)"):
        verify_bundle(path, trusted_keys=trusted(publisher))


def test_a_payload_signed_as_another_type_is_refused(tmp_path: Path, manifest: Manifest, publisher: SigningKey) -> None:
    envelope = seal_envelope(DESIRED_PAYLOAD_TYPE, manifest.encode(), [publisher])
    path = write_tar(tmp_path / "b.tar", [envelope_member(envelope), *file_members()])
    with pytest.raises(SignatureError, match=r"payload type .*desired.* where .*manifest.* was expected"):
        verify_bundle(path, trusted_keys=trusted(publisher))


def test_payload_type_is_checked_before_the_payload_is_parsed(tmp_path: Path, publisher: SigningKey) -> None:
    # The payload is not even base64: were it decoded first, this would be a BundleIntegrityError.
    envelope = json.dumps(
        {"payloadType": "text/plain", "payload": "%%% not base64 %%%", "signatures": [{"keyid": "x", "sig": "y"}]}
    ).encode()
    path = write_tar(tmp_path / "b.tar", [envelope_member(envelope), *file_members()])
    with pytest.raises(SignatureError, match="payload type 'text/plain'"):
        verify_bundle(path, trusted_keys=trusted(publisher))


def test_threshold_counts_one_key_once(tmp_path: Path, manifest: Manifest, publisher: SigningKey) -> None:
    path = write_tar(tmp_path / "b.tar", [envelope_member(sealed(manifest, publisher, publisher)), *file_members()])
    with pytest.raises(SignatureError, match=r"1 valid signature\(s\) from trusted keys, 2 required"):
        verify_bundle(path, trusted_keys=trusted(publisher), threshold=2)


def test_threshold_is_met_by_two_distinct_keys(tmp_path: Path, manifest: Manifest, publisher: SigningKey) -> None:
    second = SigningKey.generate()
    path = write_tar(tmp_path / "b.tar", [envelope_member(sealed(manifest, publisher, second)), *file_members()])
    assert verify_bundle(path, trusted_keys=trusted(publisher, second), threshold=2) == manifest


# --- unsafe archives ---------------------------------------------------------------------------

# Each case replaces the listed files with one hostile member (valid envelope first).
# -> (members after the envelope, expected error, message pattern)
UNSAFE: dict[str, tuple[Callable[[], list[Member]], type[BundleError], str]] = {
    "symlink": (
        lambda: [special("files/model.onnx", tarfile.SYMTYPE, linkname="/etc/passwd")],
        UnsafeArchiveError,
        r"'files/model\.onnx' is a link",
    ),
    "hardlink": (
        lambda: [*file_members(skip=["config.json"]), special("files/config.json", tarfile.LNKTYPE,
                                                              linkname="files/model.onnx")],
        UnsafeArchiveError,
        r"'files/config\.json' is a link",
    ),
    "char-device": (
        lambda: [special("files/model.onnx", tarfile.CHRTYPE)],
        UnsafeArchiveError,
        "is a non-regular file",
    ),
    "fifo": (lambda: [special("files/model.onnx", tarfile.FIFOTYPE)], UnsafeArchiveError, "is a non-regular file"),
    "directory": (lambda: [special("files/extra", tarfile.DIRTYPE)], UnsafeArchiveError, "is a non-regular file"),
    "setuid": (
        lambda: [reg("files/model.onnx", CONTENT["model.onnx"], mode=0o4755)],
        UnsafeArchiveError,
        "setuid/setgid/sticky",
    ),
    "dot-dot": (
        lambda: [*file_members(), reg("files/../../escaped.txt", b"pwned")],
        UnsafeArchiveError,
        r"'files/\.\./\.\./escaped\.txt' has an unsafe path",
    ),
    "absolute": (
        lambda: [*file_members(), reg("/tmp/escaped.txt", b"pwned")],
        UnsafeArchiveError,
        r"'/tmp/escaped\.txt' has an unsafe path",
    ),
    "outside-files-dir": (
        lambda: [*file_members(), reg("escaped.txt", b"pwned")],
        BundleIntegrityError,
        r"unexpected bundle member 'escaped\.txt'",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_member_is_refused_and_nothing_is_extracted(
    case: str, tmp_path: Path, manifest: Manifest, publisher: SigningKey
) -> None:
    members, error, pattern = UNSAFE[case]
    path = write_tar(tmp_path / "b.tar", [envelope_member(sealed(manifest, publisher)), *members()])

    with pytest.raises(error, match=pattern):
        verify_bundle(path, trusted_keys=trusted(publisher))

    dest = tmp_path / "out" / "slot-1"
    dest.parent.mkdir()
    with pytest.raises(error, match=pattern):
        extract_bundle(path, dest, trusted_keys=trusted(publisher))
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/escaped.txt").exists()


def test_bundle_over_max_bundle_bytes(bundle: Path, publisher: SigningKey, tmp_path: Path) -> None:
    limit = bundle.stat().st_size - 1
    limits = BundleLimits(max_bundle_bytes=limit)
    with pytest.raises(UnsafeArchiveError, match=f"over the {limit}-byte limit"):
        verify_bundle(bundle, trusted_keys=trusted(publisher), limits=limits)
    extract_leaves_nothing(bundle, tmp_path, trusted(publisher), UnsafeArchiveError, limits=limits)
    # and the same bundle passes at exactly its size
    verify_bundle(bundle, trusted_keys=trusted(publisher), limits=BundleLimits(max_bundle_bytes=limit + 1))


def test_member_over_max_file_bytes(bundle: Path, publisher: SigningKey, tmp_path: Path) -> None:
    limits = BundleLimits(max_file_bytes=4999)  # model.onnx is 5000 bytes
    with pytest.raises(UnsafeArchiveError, match=r"'files/model\.onnx' is 5000 bytes, over the limit"):
        verify_bundle(bundle, trusted_keys=trusted(publisher), limits=limits)
    extract_leaves_nothing(bundle, tmp_path, trusted(publisher), UnsafeArchiveError, limits=limits)


def test_more_than_max_members(bundle: Path, publisher: SigningKey, tmp_path: Path) -> None:
    limits = BundleLimits(max_members=3)  # the envelope and 3 files make 4
    with pytest.raises(UnsafeArchiveError, match="more than 3 members"):
        verify_bundle(bundle, trusted_keys=trusted(publisher), limits=limits)
    extract_leaves_nothing(bundle, tmp_path, trusted(publisher), UnsafeArchiveError, limits=limits)
    assert verify_bundle(bundle, trusted_keys=trusted(publisher), limits=BundleLimits(max_members=4)).name == "demo"


@pytest.mark.parametrize(
    "content",
    [b"this is not a tar archive\n" * 100, b"", bytes(range(256)) * 8],
    ids=["text", "empty", "binary"],
)
def test_not_a_tar_archive(content: bytes, tmp_path: Path, publisher: SigningKey) -> None:
    path = tmp_path / "garbage.bundle"
    path.write_bytes(content)
    with pytest.raises(UnsafeArchiveError, match="not a valid tar archive"):
        verify_bundle(path, trusted_keys=trusted(publisher))
    extract_leaves_nothing(path, tmp_path, trusted(publisher), UnsafeArchiveError)


def test_a_truncated_bundle_is_refused(bundle: Path, publisher: SigningKey, tmp_path: Path) -> None:
    # Cut inside a member's data: tarfile raises its own ReadError, which must arrive as a BundleError.
    raw = bundle.read_bytes()
    bundle.write_bytes(raw[: raw.index(CONTENT["model.onnx"]) + 100])
    with pytest.raises(UnsafeArchiveError, match="not a valid tar archive"):
        verify_bundle(bundle, trusted_keys=trusted(publisher))
    extract_leaves_nothing(bundle, tmp_path, trusted(publisher), UnsafeArchiveError)
