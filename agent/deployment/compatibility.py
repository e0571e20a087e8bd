"""Whether a verified bundle may be installed on this device: what it is, what it needs, and
whether it would be a downgrade past a publisher-set floor. Pure: the device's facts are passed in.
"""

from __future__ import annotations

import platform
from functools import cache

from edgefleet.shared.bundle.manifest import Manifest
from edgefleet.shared.bundle.versions import is_older
from edgefleet.shared.errors import DowngradeError, IncompatibleBundleError
from edgefleet.shared.wire.messages import ModelDirective

# onnxruntime execution provider -> the accelerator name manifests use.
_PROVIDER_ACCELERATORS = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "tensorrt",
    "OpenVINOExecutionProvider": "openvino",
    "ROCMExecutionProvider": "rocm",
    "CoreMLExecutionProvider": "coreml",
}


def check_installable(
    manifest: Manifest,
    directive: ModelDirective,
    *,
    machine: str,
    accelerators: frozenset[str],
    floor: str | None,
) -> None:
    """Raise unless the signed manifest is what the directive names and this device can run it.

    Raises:
        IncompatibleBundleError: Name, version or runtime differ from the directive, or the
            architecture or accelerator is not available here.
        DowngradeError: ``manifest.version`` is below ``floor`` (set by an installed manifest), or
            the two cannot be compared (fail closed).
    """
    if (manifest.name, manifest.version, manifest.runtime) != (directive.name, directive.version, directive.runtime):
        raise IncompatibleBundleError(
            f"bundle is {manifest.name}:{manifest.version} ({manifest.runtime}), the desired state names "
            f"{directive.name}:{directive.version} ({directive.runtime})"
        )
    arches = manifest.compatibility.architectures
    if arches and machine not in arches:
        raise IncompatibleBundleError(f"bundle is for {list(arches)}, this device is {machine}")
    wanted = manifest.compatibility.accelerators
    if wanted and not set(wanted) & accelerators:
        raise IncompatibleBundleError(
            f"bundle needs one of the accelerators {list(wanted)}, this device has {sorted(accelerators) or 'none'}"
        )
    if floor is not None and is_older(manifest.version, floor):
        raise DowngradeError(
            f"{manifest.name} {manifest.version} is below the version floor {floor} set by an installed release"
        )


def raised_floor(floor: str | None, manifest: Manifest) -> str | None:
    """The floor after installing ``manifest``: floors only go up.

    Raises:
        DowngradeError: The floor and the manifest's ``min_version`` cannot be compared.
    """
    if manifest.min_version is None:
        return floor
    if floor is None or is_older(floor, manifest.min_version):
        return manifest.min_version
    return floor


def preferred_providers(
    bundle_accelerators: tuple[str, ...], configured: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """ONNX Runtime providers to prefer for a bundle: the agent's config wins; else the bundle's
    accelerators in its order (CPU stays the last resort); else ``None`` (automatic choice)."""
    if configured is not None:
        return configured
    by_accelerator = {acc: provider for provider, acc in _PROVIDER_ACCELERATORS.items()}
    wanted = tuple(by_accelerator[a] for a in bundle_accelerators if a in by_accelerator)
    return wanted + ("CPUExecutionProvider",) if wanted else None


@cache
def device_accelerators() -> frozenset[str]:
    """Accelerators this node offers, from the installed onnxruntime's providers."""
    try:
        import onnxruntime
    except ImportError:
        return frozenset()
    return frozenset(
        _PROVIDER_ACCELERATORS[p] for p in onnxruntime.get_available_providers() if p in _PROVIDER_ACCELERATORS
    )


def device_machine() -> str:
    """This node's CPU architecture as ``platform.machine()`` names it (x86_64, aarch64, armv7l)."""
    return platform.machine()
