"""Transfer benchmark: how fast a bundle reaches an agent, against the raw speed of the same pipes.

Run from the repository root::

    python bench/transfer.py            # a 64 MiB bundle
    python bench/transfer.py --quick    # a 16 MiB bundle, well under a minute on 2 cores

What it sets up: a Mosquitto of its own, a real control plane process on it (``LocalFleet``) that
publishes a real ONNX model (an MLP with large weights, so the bundle is the wanted size) and
deploys it to the device ``bench-dev``. The agent side runs in this process: the agent's own
``MqttLink`` and ``ChunkFetcher`` (MQTT) and ``HttpFetcher`` (HTTP), timed from the first request
to the complete, sha256-checked bundle file.

What it compares (median of ``--runs``):

- ``mqtt``: ChunkFetcher through the control plane's chunk handler, vs raw paho moving the same
  bytes in messages of the same size (chunk + header), QoS 1, TCP_NODELAY, the same in-flight window,
  publisher -> subscriber through the same broker;
- ``http``: HttpFetcher from the control plane's ``GET /api/v1/bundles/{digest}``, vs a raw httpx
  streaming GET of the same URL (bytes read and dropped);
- ``verify_mb_s``: ``verify_bundle`` (publisher signature and every file hash) on the bundle;
- ``resume_resent_chunks``: a fetch (under a bandwidth cap, so it is mid-way for certain) is cut
  by restarting the broker once a third of the chunks are in; the chunks that then arrived twice.

The last line of stdout is one JSON object: ``{"bench": "transfer", "results", "baseline",
"ratio", "goal_met"}``; goal: both ratios >= 0.5 and at most one window of chunks re-sent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/transfer.py` puts bench/ first, not the repository
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

from edgefleet.agent.config import BrokerConfig, TransferConfig  # noqa: E402
from edgefleet.agent.link import MqttLink  # noqa: E402
from edgefleet.agent.transfer.bandwidth import BandwidthLimiter  # noqa: E402
from edgefleet.agent.transfer.http import HttpFetcher  # noqa: E402
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher  # noqa: E402
from edgefleet.control_plane.broker.embedded import BrokerSettings, find_mosquitto, start_mosquitto  # noqa: E402
from edgefleet.control_plane.devtools.demo_models import build_onnx_mlp, make_mlp_weights  # noqa: E402
from edgefleet.control_plane.devtools.local_fleet import LocalFleet  # noqa: E402
from edgefleet.shared.bundle.format import verify_bundle  # noqa: E402
from edgefleet.shared.link.paho import make_client  # noqa: E402
from edgefleet.shared.trust.signing import key_id, public_key_from_hex  # noqa: E402
from edgefleet.shared.wire.chunks import HEADER_BYTES, ChunkRequest, chunk_count  # noqa: E402
from edgefleet.shared.wire.topics import Leaf  # noqa: E402

DEVICE = "bench-dev"
MIB = 1024 * 1024
# (n_inputs, hidden) of an MLP whose fp32 weights make a bundle of about the wanted size.
SHAPES = {16: (1024, (2048, 1024)), 64: (2048, (4096, 2048))}
GOAL_RATIO = 0.5


class InProcessAgent:
    """The agent's MQTT side, in this process: its link and its chunk fetcher."""

    def __init__(self, host: str, port: int, downloads: Path, config: TransferConfig) -> None:
        broker = BrokerConfig(host=host, port=port, reconnect_min_s=1, reconnect_max_s=2)
        self.link = MqttLink(DEVICE, broker, self._on_message)
        self.config = config
        self.fetcher = ChunkFetcher(downloads, config, self._request, link_up=self.link.connected)

    def use(self, downloads: Path, config: TransferConfig, limiter: BandwidthLimiter | None = None) -> ChunkFetcher:
        self.fetcher = ChunkFetcher(downloads, config, self._request, limiter=limiter, link_up=self.link.connected)
        return self.fetcher

    def _on_message(self, leaf: Leaf, payload: bytes) -> None:
        if leaf is Leaf.CHUNK_DATA:
            self.fetcher.on_message(payload)

    def _request(self, request: ChunkRequest) -> None:
        self.link.publish(Leaf.CHUNK_REQUEST, request.encode())


def build_model(directory: Path, size_mib: int) -> Path:
    n_inputs, hidden = SHAPES[size_mib]
    path = directory / f"mlp-{size_mib}mib.onnx"
    path.write_bytes(build_onnx_mlp(make_mlp_weights(n_inputs=n_inputs, hidden=hidden, seed=7)))
    return path


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def raw_paho(host: str, port: int, messages: int, payload_bytes: int, window: int) -> float:
    """Seconds to move ``messages`` QoS 1 messages publisher -> subscriber through the broker."""
    topic = f"bench/raw/{time.time_ns()}"
    got = 0
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: mqtt.Client, _u: Any, _m: mqtt.MQTTMessage) -> None:
        nonlocal got
        got += 1
        if got == messages:
            done.set()

    sub = make_client(f"bench-sub-{time.time_ns()}", clean_session=True)
    sub.max_inflight_messages_set(window)
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.on_connect = lambda c, *_a: c.subscribe(topic, qos=1)
    pub = make_client(f"bench-pub-{time.time_ns()}", clean_session=True)
    pub.max_inflight_messages_set(window)
    connected = threading.Event()
    pub.on_connect = lambda *_a: connected.set()
    sub.connect(host, port)
    pub.connect(host, port)
    sub.loop_start()
    pub.loop_start()
    try:
        if not (subscribed.wait(10) and connected.wait(10)):
            raise RuntimeError("raw paho clients did not connect")
        payload = bytes(payload_bytes)
        started = time.perf_counter()
        for _ in range(messages):
            pub.publish(topic, payload, qos=1)
        if not done.wait(120):
            raise RuntimeError(f"raw paho: {got} of {messages} messages arrived")
        return time.perf_counter() - started
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()


def raw_httpx(url: str) -> tuple[float, int]:
    with httpx.Client(timeout=60) as client:
        client.get(url.rsplit("/api/", 1)[0] + "/healthz")  # connection set up outside the timing
        started = time.perf_counter()
        n = 0
        with client.stream("GET", url) as response:
            response.raise_for_status()
            for block in response.iter_bytes():
                n += len(block)
        return time.perf_counter() - started, n


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def mb_s(n_bytes: int, seconds: float) -> float:
    return round(n_bytes / seconds / 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 16 MiB bundle instead of 64 MiB")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each measurement (median)")
    parser.add_argument("--chunk-kib", type=int, default=TransferConfig().chunk_size_bytes // 1024)
    parser.add_argument("--window", type=int, default=TransferConfig().window_chunks)
    args = parser.parse_args(argv)
    size_mib = 16 if args.quick else 64
    config = TransferConfig(chunk_size_bytes=args.chunk_kib * 1024, window_chunks=args.window)
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto is required: apt-get install mosquitto", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = start_mosquitto(BrokerSettings(data_dir=tmp / "broker"), binary=binary)
        fleet = LocalFleet(tmp / "fleet", broker_host=broker.host, broker_port=broker.port)
        agent: InProcessAgent | None = None
        try:
            client = fleet.start_control_plane()
            model = build_model(tmp, size_mib)
            client.push_model(model, name="bench", version="1.0.0")
            httpx.post(f"{fleet.api_url}/api/v1/devices", json={"id": DEVICE}, timeout=10).raise_for_status()
            client.deploy("bench", "1.0.0", devices=[DEVICE])
            published = next(m for m in client.models() if m["name"] == "bench")
            digest, size = published["bundle_digest"], published["bundle_size"]
            total = chunk_count(size, config.chunk_size_bytes)

            agent = InProcessAgent(broker.host, broker.port, tmp / "dl-mqtt", config)
            agent.link.start()
            if not agent.link.connected.wait(10):
                raise RuntimeError("the in-process agent did not connect")

            # -- MQTT: ChunkFetcher vs raw paho ---------------------------------------------------
            # Ours and the baseline alternate, so that load from elsewhere hits both alike.
            mqtt_times, raw_times = [], []
            for run in range(args.runs + 1):  # the first run warms the control plane's chunk cache
                fetcher = agent.use(tmp / "dl-mqtt", config)
                path = fetcher.bundle_path(digest)
                path.unlink(missing_ok=True)
                seconds = timed(lambda f=fetcher: f.fetch(digest, size, threading.Event()))
                if run:
                    mqtt_times.append(seconds)
                    message_bytes = config.chunk_size_bytes + HEADER_BYTES
                    raw_times.append(raw_paho(broker.host, broker.port, total, message_bytes, config.window_chunks))
            mqtt_s, raw_mqtt_s = statistics.median(mqtt_times), statistics.median(raw_times)
            progress(f"mqtt: {mb_s(size, mqtt_s)} MB/s, raw paho {mb_s(size, raw_mqtt_s)} MB/s")

            # -- verify ----------------------------------------------------------------------------
            keys = {key_id(k): k for k in map(public_key_from_hex, fleet.info["keys"]["publisher"])}
            verify_s = statistics.median(
                timed(lambda: verify_bundle(path, trusted_keys=keys)) for _ in range(args.runs)
            )

            # -- HTTP: HttpFetcher vs raw httpx ---------------------------------------------------
            url = f"{fleet.api_url}/api/v1/bundles/{digest}"
            http_fetcher = HttpFetcher(tmp / "dl-http", config)
            http_times, raw_http = [], []
            for run in range(args.runs + 1):  # the first run opens the connection
                (tmp / "dl-http" / path.name).unlink(missing_ok=True)
                seconds = timed(lambda: http_fetcher.fetch(digest, size, [url], threading.Event()))
                if run:
                    http_times.append(seconds)
                    raw_http.append(raw_httpx(url))
            assert all(n == size for _, n in raw_http)
            http_s, raw_http_s = statistics.median(http_times), statistics.median(t for t, _ in raw_http)
            progress(f"http: {mb_s(size, http_s)} MB/s, raw httpx {mb_s(size, raw_http_s)} MB/s")

            # -- resume: cut once mid-way by a broker restart ---------------------------------------
            resume_dir = tmp / "dl-resume"
            shutil.rmtree(resume_dir, ignore_errors=True)
            # Capped so the cut surely lands mid-transfer: the whole bundle would take ~1.5 s.
            cap = BandwidthLimiter(int(size / 1.5), burst_bytes=config.chunk_size_bytes * config.window_chunks)
            fetcher = agent.use(resume_dir, config, limiter=cap)
            have_file = resume_dir / f"{digest.removeprefix('sha256:')}.have"
            outcome: list[BaseException | Path] = []

            def fetch_in_thread(f: ChunkFetcher = fetcher) -> None:
                try:
                    outcome.append(f.fetch(digest, size, threading.Event()))
                except BaseException as exc:
                    outcome.append(exc)

            worker = threading.Thread(target=fetch_in_thread)
            resume_started = time.perf_counter()
            worker.start()
            while worker.is_alive() and (not have_file.exists() or (have_file.stat().st_size - 4) // 4 < total // 3):
                time.sleep(0.005)
            if not worker.is_alive():
                raise RuntimeError(f"the capped transfer ended before it could be cut: {outcome}")
            had_at_cut = (have_file.stat().st_size - 4) // 4
            broker.restart()
            worker.join(timeout=120)
            resume_s = time.perf_counter() - resume_started
            if not outcome or not isinstance(outcome[0], Path):
                raise RuntimeError(f"the resumed fetch did not complete: {outcome}")
            resent = fetcher.stats["duplicates"]
            rerequested = fetcher.stats["chunks_requested"] - total
        finally:
            if agent is not None:
                agent.link.stop()
            fleet.stop()
            broker.stop()

    results = {
        "bundle_bytes": size,
        "chunk_bytes": config.chunk_size_bytes,
        "window_chunks": config.window_chunks,
        "mqtt_mb_s": mb_s(size, mqtt_s),
        "http_mb_s": mb_s(size, http_s),
        "verify_mb_s": mb_s(size, verify_s),
        "resume_resent_chunks": resent,
        "resume_rerequested_chunks": rerequested,
        "resume_chunks_before_cut": had_at_cut,
        "resume_total_s": round(resume_s, 2),
    }
    baseline = {"raw_paho_mb_s": mb_s(size, raw_mqtt_s), "raw_httpx_mb_s": mb_s(size, raw_http_s)}
    ratio = {"mqtt": round(raw_mqtt_s / mqtt_s, 3), "http": round(raw_http_s / http_s, 3)}
    goal_met = ratio["mqtt"] >= GOAL_RATIO and ratio["http"] >= GOAL_RATIO and resent <= config.window_chunks

    print(
        f"transfer benchmark: {size / MIB:.0f} MiB bundle, {config.chunk_size_bytes // 1024} KiB chunks, "
        f"window {config.window_chunks}, median of {args.runs}"
    )
    rows = [
        (
            "MQTT  ChunkFetcher via control plane",
            results["mqtt_mb_s"],
            "raw paho pub->sub",
            baseline["raw_paho_mb_s"],
            ratio["mqtt"],
        ),
        (
            "HTTP  HttpFetcher (range, resumable)",
            results["http_mb_s"],
            "raw httpx GET",
            baseline["raw_httpx_mb_s"],
            ratio["http"],
        ),
    ]
    print(f"{'path':<38} {'MB/s':>8}   {'baseline':<20} {'MB/s':>8} {'ratio':>7}")
    for name, ours, base_name, base, r in rows:
        print(f"{name:<38} {ours:>8.1f}   {base_name:<20} {base:>8.1f} {r:>7.3f}")
    print(f"{'verify_bundle':<38} {results['verify_mb_s']:>8.1f}")
    print(
        f"resume after a broker restart at chunk {had_at_cut}/{total}: {resent} chunks arrived twice, "
        f"{rerequested} asked for again (window {config.window_chunks}); {resume_s:.1f} s in all"
    )
    print(f"goal met: {goal_met}")
    print(
        json.dumps(
            {"bench": "transfer", "results": results, "baseline": baseline, "ratio": ratio, "goal_met": goal_met}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
