"""The I/O steps of installing one bundle: download, verify, unpack into a slot, load, health-check.

Each step either returns its result or raises; what an exception means for the deployment is
decided elsewhere (:func:`edgefleet.agent.deployment.failures.classify`). Deployments and shadow
candidates use the same steps.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.deployment.compatibility import (
    check_installable,
    device_accelerators,
    device_machine,
    preferred_providers,
)
from edgefleet.agent.deployment.health_check import ZEROS_NOTE, has_sample_inputs, run_health_check, sample_inputs
from edgefleet.agent.deployment.state_store import ActiveModel, ShadowModel
from edgefleet.agent.deployment.trust_store import TrustStore
from edgefleet.agent.transfer.http import HttpFetcher
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher
from edgefleet.shared.bundle.format import BundleLimits, extract_bundle, verify_bundle
from edgefleet.shared.bundle.manifest import Manifest
from edgefleet.shared.errors import InferenceError, TransferError
from edgefleet.shared.runtimes import LoadedModel, RuntimeOptions, load_model
from edgefleet.shared.wire.messages import ModelDirective

log = logging.getLogger(__name__)


class BundleSteps:
    """Fetch, verify, stage, load and check bundles under ``<data_dir>/models``."""

    def __init__(
        self,
        config: AgentConfig,
        trust: TrustStore,
        fetcher: ChunkFetcher,
        http_fetcher: HttpFetcher | None,
        cancel: threading.Event,
    ) -> None:
        self._config = config
        self._trust = trust
        self._fetcher = fetcher
        self._http_fetcher = http_fetcher  # None: bundles come only over MQTT
        self._cancel = cancel  # set when a newer desired state supersedes a download
        self.models_dir = config.data_dir / "models"
        self._limits = BundleLimits(max_bundle_bytes=config.transfer.max_bundle_bytes)
        self._runtime_options = RuntimeOptions(
            intra_op_threads=config.runtime.intra_op_threads, providers=config.runtime.onnx_providers
        )

    def download(self, directive: ModelDirective) -> Path:
        """HTTP(S) when the directive has URLs or the agent prefers its control plane's; else, or
        when every HTTP source fails, MQTT chunks (both resume from the same partial download)."""
        digest, size = directive.bundle_digest, directive.bundle_size
        sources = self._http_fetcher.sources(digest, directive.urls) if self._http_fetcher else ()
        if sources:
            assert self._http_fetcher is not None
            try:
                return self._http_fetcher.fetch(digest, size, sources, self._cancel)
            except TransferError as exc:
                log.warning("HTTP download of %s failed, falling back to MQTT chunks: %s", digest[:19], exc)
        return self._fetcher.fetch(digest, size, self._cancel)

    def verify(self, bundle: Path, directive: ModelDirective, floor: str | None) -> Manifest:
        """The bundle's signed manifest, if it verifies and this device may install it."""
        manifest = verify_bundle(
            bundle,
            trusted_keys=self._trust.publisher_keys,
            threshold=self._trust.publisher_threshold,
            limits=self._limits,
        )
        check_installable(
            manifest, directive, machine=device_machine(), accelerators=device_accelerators(), floor=floor
        )
        return manifest

    def stage(self, bundle: Path, directive: ModelDirective) -> Path:
        """Unpack the bundle into its slot (verifying again as it extracts); return the slot."""
        slot = self.models_dir / directive.name / slot_name(directive.version, directive.bundle_digest)
        if slot.exists():
            bundle.unlink(missing_ok=True)  # e.g. killed after the unpack, before STAGED was persisted
            return slot  # staged before (e.g. a rollback target): extraction renames atomically, so it is complete
        extract_bundle(
            bundle,
            slot,
            trusted_keys=self._trust.publisher_keys,
            threshold=self._trust.publisher_threshold,
            limits=self._limits,
        )
        bundle.unlink(missing_ok=True)  # the slot holds the verified files now
        return slot

    def load(self, active: ActiveModel) -> LoadedModel:
        """Load an installed model from its slot, with the providers its bundle prefers."""
        path = self.models_dir / active.name / active.slot / active.model_file
        providers = preferred_providers(active.accelerators, self._config.runtime.onnx_providers)
        options = dataclasses.replace(self._runtime_options, providers=providers)
        return load_model(active.runtime, path, name=active.name, version=active.version, options=options)

    def load_shadow(self, entry: ShadowModel) -> LoadedModel:
        """Load a staged shadow candidate from its slot."""
        path = self.models_dir / entry.name / entry.slot / entry.model_file
        return load_model(entry.runtime, path, name=entry.name, version=entry.version, options=self._runtime_options)

    def health_check(self, model: LoadedModel, slot: Path | None = None, manifest: Manifest | None = None) -> str:
        """Warm-up inference on the bundle's sample inputs (or zeros) within its latency budget.

        Returns:
            What the deployment outcome should say about the check: "" when it ran on the
            bundle's sample inputs, else that it ran on zeros.

        Raises:
            InferenceError: The check failed (its message then says too if it ran on zeros,
                which models with parameter inputs such as Resize ``scales`` refuse).
        """
        budget_s = self._config.health_check_timeout_s
        if manifest is not None and manifest.latency_budget_ms is not None:
            budget_s = manifest.latency_budget_ms / 1000.0
        inputs = sample_inputs(model, slot, manifest)
        note = "" if has_sample_inputs(slot, manifest) else ZEROS_NOTE
        try:
            run_health_check(model, inputs, budget_s)
        except InferenceError as exc:
            if note:
                raise InferenceError(f"{exc} ({note})") from exc
            raise
        return note


def slot_name(version: str, bundle_digest: str) -> str:
    """The directory under ``models/<name>/`` a bundle is unpacked into."""
    return f"{version}-{bundle_digest[7:19]}"
