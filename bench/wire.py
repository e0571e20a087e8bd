"""Wire benchmark: how long decoding one message takes, per message the fleet exchanges most.

Run from the repository root::

    python bench/wire.py            # about 20 seconds
    python bench/wire.py --quick    # a few seconds

Each figure is the best of ``--repeats`` timings of a loop of decodes, in microseconds per
message (the best, not the mean: it is the least disturbed by other work on the machine). The
messages are realistic and large where it matters: a desired state with 32 models (the maximum,
half of them with download URLs, a quarter with a shadow), a reported state with 8 models and
2 shadows, a chunk request for 256 chunks, a deployment event, a chunk error, and a 64 KiB binary
chunk (hashed on decode: the hot path of a transfer).

The last line of stdout is one JSON object: ``{"bench": "wire", "us_per_decode": {...}}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/wire.py` puts bench/ first, not the repository
    sys.path.insert(0, str(ROOT))

from edgefleet.shared.wire.chunks import Chunk, ChunkError, ChunkRequest, decode_chunk_message  # noqa: E402
from edgefleet.shared.wire.messages import (  # noqa: E402
    DeploymentEvent,
    DesiredState,
    ModelDirective,
    ModelReport,
    Outcome,
    ReportedState,
    ShadowDirective,
    ShadowReport,
    decode_event,
)

NOW = 1_700_000_000.0


def _digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def desired_state(models: int = 32) -> DesiredState:
    """A desired state with ``models`` models: some with URLs, some with a shadow candidate."""
    directives = []
    for i in range(models):
        urls = (f"https://cdn.example.com/bundles/{_digest(i)}",) if i % 2 else ()
        shadow = (
            ShadowDirective(version=f"1.{i}.1", bundle_digest=_digest(1000 + i), bundle_size=2_000_000,
                            runtime="onnx", sample_rate=0.1)
            if i % 4 == 0
            else None
        )
        directives.append(
            ModelDirective(name=f"model-{i:02d}", version=f"1.{i}.0", bundle_digest=_digest(i),
                           bundle_size=1_000_000 + i, runtime="onnx" if i % 3 else "tflite", urls=urls, shadow=shadow)
        )
    return DesiredState(device_id="pi-kitchen-01", sequence=42, issued_at=NOW, expires_at=NOW + 3600,
                        models=tuple(directives))


def reported_state(models: int = 8) -> ReportedState:
    """A reported state with ``models`` models and two shadows."""
    return ReportedState(
        device_id="pi-kitchen-01",
        ts=NOW + 1.5,
        applied_sequence=41,
        models=tuple(
            ModelReport(name=f"model-{i:02d}", version=f"1.{i}.0", bundle_digest=_digest(i), runtime="onnx",
                        state="serving" if i % 5 else "failed")
            for i in range(models)
        ),
        agent={"version": "0.1.0", "arch": "aarch64", "python": "3.11.2"},
        shadows=tuple(
            ShadowReport(name=f"model-{i:02d}", serving_version=f"1.{i}.0", version=f"1.{i}.1",
                         bundle_digest=_digest(1000 + i), state="running", samples=1200, agreements=1188, errors=0,
                         mean_abs_diff=0.0012, max_abs_diff=0.031, latency_p50_ms=4.2, serving_latency_p50_ms=4.0)
            for i in (0, 4)
        ),
    )


EVENT = DeploymentEvent(event_id="0f8fad5b-d9cb-469f-a165-70867728950e", device_id="pi-kitchen-01", ts=NOW + 2,
                        sequence=42, name="model-03", version="1.3.0", bundle_digest=_digest(3),
                        outcome=Outcome.FAILED_ROLLED_BACK, error_code="runtime_load_failed",
                        message="the model would not load", duration_s=12.25)
REQUEST = ChunkRequest(bundle_digest=_digest(1), chunk_size=64 * 1024, indices=tuple(range(256)))
CHUNK_ERROR = ChunkError(bundle_digest=_digest(1), code="not_found", message="no such bundle")
_DATA = bytes(range(256)) * 256
CHUNK = Chunk(bundle_digest=_digest(1), chunk_size=len(_DATA), index=3, total_size=10 * len(_DATA), data=_DATA)


def cases() -> dict[str, tuple[Callable[[bytes], object], bytes]]:
    """What is timed: a decoder and the bytes it decodes, by name."""
    return {
        "desired_32_models": (DesiredState.decode, desired_state().encode()),
        "desired_1_model": (DesiredState.decode, desired_state(1).encode()),
        "reported_8_models": (ReportedState.decode, reported_state().encode()),
        "deployment_event": (decode_event, EVENT.encode()),
        "chunk_request_256": (ChunkRequest.decode, REQUEST.encode()),
        "chunk_error": (decode_chunk_message, CHUNK_ERROR.encode()),
        "chunk_64k": (decode_chunk_message, CHUNK.encode()),
    }


def time_decode(decode: Callable[[bytes], object], data: bytes, repeats: int, target_s: float) -> float:
    """Best time of one decode of ``data``, in microseconds."""
    timer = timeit.Timer(lambda: decode(data))
    loops, _ = timer.autorange()
    loops = max(1, int(loops * target_s / 0.2))
    return min(timer.repeat(repeat=repeats, number=loops)) / loops * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter timings")
    parser.add_argument("--repeats", type=int, default=None, help="timings per message (best is kept)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    target_s = 0.05 if args.quick else 0.2
    results: dict[str, float] = {}
    for name, (decode, data) in cases().items():
        decode(data)  # a decoder that fails here would time its error path
        results[name] = round(time_decode(decode, data, repeats, target_s), 2)
        print(f"{name:20s} {len(data):7d} bytes  {results[name]:9.2f} us/decode")
    print(json.dumps({"bench": "wire", "us_per_decode": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
