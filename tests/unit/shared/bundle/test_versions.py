"""The one version grammar (PEP 440): refused where it enters, and comparisons that fail closed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from support.manifests import MANIFEST

from edgefleet.shared.bundle.manifest import Manifest
from edgefleet.shared.bundle.versions import check_version, is_older
from edgefleet.shared.errors import DowngradeError, MessageError


@pytest.mark.parametrize("version", ["1", "1.2.0", "2.0.0rc1", "1.0.0-rc1", "1.0.post2", "3.1.dev4", "1.0+cu121"])
def test_pep440_versions_are_accepted(version: str) -> None:
    assert check_version(version) == version
    assert Manifest.decode(replace(MANIFEST, version=version, min_version=version).encode()).version == version


@pytest.mark.parametrize("version", ["legacy", "v1-final", "latest", "1.0.0-beta.x", "2024_01"])
def test_other_versions_are_refused_by_the_manifest_decoder(version: str) -> None:
    with pytest.raises(MessageError, match="not a PEP 440 version"):
        check_version(version)
    with pytest.raises(MessageError, match=r"manifest\.version.*PEP 440"):
        Manifest.decode(replace(MANIFEST, version=version).encode())
    raw = json.loads(MANIFEST.encode())
    raw["min_version"] = version
    with pytest.raises(MessageError, match=r"manifest\.min_version.*PEP 440"):
        Manifest.from_dict(raw)


def test_the_wire_character_set_still_applies() -> None:
    with pytest.raises(MessageError, match="must match"):
        check_version("1.0 beta")


def test_comparisons_are_pep440_and_undefined_ones_raise() -> None:
    assert is_older("1.9", "1.10")
    assert not is_older("2.0.0", "2.0")
    assert is_older("2.0.0rc1", "2.0.0")
    with pytest.raises(DowngradeError, match="cannot be compared"):
        is_older("legacy", "2.0.0")
    with pytest.raises(DowngradeError, match="cannot be compared"):
        is_older("2.0.0", "legacy")
