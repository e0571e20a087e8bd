"""Install-time checks on a verified manifest: identity, architecture, accelerator, version floor."""

from __future__ import annotations

from dataclasses import replace

import pytest
from msgspec.structs import replace as replace_struct
from support.manifests import MANIFEST

from edgefleet.agent.deployment.compatibility import check_installable, preferred_providers, raised_floor
from edgefleet.shared.bundle.manifest import Compatibility, Manifest
from edgefleet.shared.errors import DowngradeError, IncompatibleBundleError
from edgefleet.shared.wire.messages import ModelDirective

DIGEST = "sha256:" + "ab" * 32
DIRECTIVE = ModelDirective(name="det", version="2.0.0", bundle_digest=DIGEST, bundle_size=100, runtime="onnx")


def check(
    manifest: Manifest = MANIFEST,
    directive: ModelDirective = DIRECTIVE,
    *,
    machine: str = "x86_64",
    accelerators: frozenset[str] = frozenset(),
    floor: str | None = None,
) -> None:
    check_installable(manifest, directive, machine=machine, accelerators=accelerators, floor=floor)


def test_a_matching_bundle_is_installable() -> None:
    check()


@pytest.mark.parametrize("field,value", [("name", "other"), ("version", "2.0.1"), ("runtime", "tflite")])
def test_a_signed_bundle_that_is_not_what_the_directive_names_is_refused(field: str, value: str) -> None:
    with pytest.raises(IncompatibleBundleError, match="the desired state names"):
        check(directive=replace_struct(DIRECTIVE, **{field: value}))


def test_wrong_architecture_is_refused() -> None:
    manifest = replace(MANIFEST, compatibility=Compatibility(architectures=("aarch64",)))
    with pytest.raises(IncompatibleBundleError, match="aarch64"):
        check(manifest, machine="x86_64")
    check(manifest, machine="aarch64")


def test_a_missing_accelerator_is_refused() -> None:
    manifest = replace(MANIFEST, compatibility=Compatibility(accelerators=("cuda", "tensorrt")))
    with pytest.raises(IncompatibleBundleError, match="accelerators"):
        check(manifest, accelerators=frozenset({"openvino"}))
    check(manifest, accelerators=frozenset({"tensorrt"}))


def test_a_downgrade_below_the_floor_is_refused_and_floors_only_rise() -> None:
    old = replace(MANIFEST, version="1.4.0")
    with pytest.raises(DowngradeError, match="floor 1.5"):
        check(old, replace_struct(DIRECTIVE, version="1.4.0"), floor="1.5")
    check(old, replace_struct(DIRECTIVE, version="1.4.0"), floor="1.4.0")  # at the floor is fine
    check(old, replace_struct(DIRECTIVE, version="1.4.0"), floor=None)  # operators may roll back freely without one
    assert raised_floor(None, replace(MANIFEST, min_version="1.5")) == "1.5"
    assert raised_floor("2.0", replace(MANIFEST, min_version="1.5")) == "2.0"
    assert raised_floor("1.0", MANIFEST) == "1.0"


def test_provider_preference_config_wins_then_the_bundles_accelerators() -> None:
    assert preferred_providers(("tensorrt", "cuda"), None) == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert preferred_providers(("cuda",), ("OpenVINOExecutionProvider",)) == ("OpenVINOExecutionProvider",)
    assert preferred_providers((), None) is None  # automatic: best the node has
    assert preferred_providers(("unknown-npu",), None) is None


def test_a_version_that_does_not_parse_is_not_let_in_under_a_floor() -> None:
    # "legacy" is no PEP 440 version: the comparison is undefined, and an undefined answer refuses.
    legacy = replace(MANIFEST, version="legacy")
    with pytest.raises(DowngradeError, match="cannot be compared"):
        check(legacy, replace_struct(DIRECTIVE, version="legacy"), floor="2.0.0")
    with pytest.raises(DowngradeError, match="cannot be compared"):
        check(MANIFEST, floor="legacy")  # a floor stored before the grammar was enforced
    with pytest.raises(DowngradeError, match="cannot be compared"):
        raised_floor("legacy", replace(MANIFEST, min_version="1.5"))
