"""Inference benchmark: the agent's serving path against the runtimes and a hand-written server.

Run from the repository root::

    python bench/inference.py            # more rounds, steadier numbers
    python bench/inference.py --quick    # well under a minute on 2 cores

The model is the demo MLP (``control_plane.devtools.demo_models``: 32 -> 64 -> 64 -> 4, softmax), built
here as ONNX and as TFLite from the same weights.

What it compares (every pair measured in the same run, in alternating rounds so that drift and
other load on the machine hit both sides alike; p50/p99 over all rounds' samples):

- in-process, batch 1 and 64: ``ModelHost.get(name).predict(inputs)``, what the inference API
  calls per request (registry lookup, signature validation, runtime call), vs raw
  ``InferenceSession.run`` on a session with the same options (1 intra-op thread, sequential)
  and raw LiteRT ``set_tensor`` + ``invoke`` + ``get_tensor`` on an interpreter allocated for the
  batch size. ``overhead_us_b1`` = agent p50 - raw p50; ``ratio.b64`` = agent p50 / raw p50.
- local HTTP, batch 1, JSON, one keep-alive httpx client sending one request at a time: the
  agent's API (``create_inference_app`` over a ``ModelHost``, default settings) vs a minimal
  hand-written FastAPI + onnxruntime/LiteRT server doing the same with no validation (written
  below), each under uvicorn (same settings as the agent) in its own process. ``http_p50`` is
  agent/hand-written latency (lower is better); ``http_rps`` is agent/hand-written requests per
  second (higher is better), which with one client at a time is 1 / mean latency.
- concurrent HTTP (informative, not a goal): 8 client threads against the agent with dynamic
  batching off and on.

Every path's answer is checked against the raw runtime before it is timed.

The last line of stdout is one JSON object: ``{"bench": "inference", "results", "baseline",
"ratio", "goal_met"}``; goal: ``overhead_us_b1 <= 10``, ``ratio.b64 <= 1.2`` and
``ratio.http_p50 <= 1.0``. HTTP latencies on a shared 2-core machine move by several percent
between rounds: ``results.http_p50_ratio_round_min/max`` give the spread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/inference.py` puts bench/ first, not the repository
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from fastapi import FastAPI, Request, Response  # noqa: E402

from edgefleet.control_plane.devtools.demo_models import INPUT_NAME, OUTPUT_NAME, write_demo_models  # noqa: E402

ONNX_MODEL = "classifier-onnx"
TFLITE_MODEL = "classifier-tflite"
VERSION = "1.0.0"
N_INPUTS = 32
GOAL_OVERHEAD_US_B1 = 10.0
GOAL_RATIO_B64 = 1.2
GOAL_RATIO_HTTP_P50 = 1.0
SERVER_START_TIMEOUT_S = 60.0


# --- statistics ----------------------------------------------------------------------------------


def pct(samples_ns: list[int], q: float) -> float:
    """The q-quantile (0..1) of ``samples_ns``, in microseconds (nearest rank)."""
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def time_calls(fn: Callable[[], object], n: int) -> list[int]:
    """Run ``fn`` n times; return each call's duration in ns."""
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


# --- the models, loaded three ways -----------------------------------------------------------------


def load_host(models: dict[str, Path]) -> Any:
    """A ModelHost serving both demo models, as the agent loads them (default RuntimeOptions)."""
    from edgefleet.agent.serving.host import ModelHost
    from edgefleet.shared.runtimes import load_model

    host = ModelHost()
    host.swap(ONNX_MODEL, load_model("onnx", models["onnx"], name=ONNX_MODEL, version=VERSION))
    host.swap(TFLITE_MODEL, load_model("tflite", models["tflite"], name=TFLITE_MODEL, version=VERSION))
    return host


def raw_onnx_session(path: Path) -> Any:
    """A plain InferenceSession with the options the agent uses (so only the agent's code differs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class RawLiteRT:
    """set_tensor + invoke + get_tensor on an interpreter allocated for one batch size."""

    def __init__(self, path: Path, batch: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        (inp,), (out,) = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        self.input_index, self.output_index = inp["index"], out["index"]
        self.interpreter.resize_tensor_input(self.input_index, [batch, N_INPUTS], strict=True)
        self.interpreter.allocate_tensors()

    def run(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input_index, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index)


# --- (a) in-process ------------------------------------------------------------------------------


def bench_in_process(models: dict[str, Path], rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """p50/p99 (µs) of agent and raw paths, per runtime and batch size."""
    host = load_host(models)
    session = raw_onnx_session(models["onnx"])
    out: dict[str, dict[str, float]] = {}
    for batch in (1, 64):
        x = np.random.default_rng(batch).standard_normal((batch, N_INPUTS)).astype(np.float32)
        litert = RawLiteRT(models["tflite"], batch)
        paths: dict[str, Callable[[], object]] = {
            "onnx_raw": lambda x=x: session.run([OUTPUT_NAME], {INPUT_NAME: x}),
            "onnx_agent": lambda x=x: host.get(ONNX_MODEL).predict({INPUT_NAME: x}),
            "litert_raw": lambda x=x, litert=litert: litert.run(x),
            "litert_agent": lambda x=x: host.get(TFLITE_MODEL).predict({INPUT_NAME: x}),
        }
        reference = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        np.testing.assert_allclose(host.get(ONNX_MODEL).predict({INPUT_NAME: x})[OUTPUT_NAME], reference, atol=1e-6)
        np.testing.assert_allclose(host.get(TFLITE_MODEL).predict({INPUT_NAME: x})[OUTPUT_NAME], reference, atol=1e-5)
        np.testing.assert_allclose(litert.run(x), reference, atol=1e-5)
        samples: dict[str, list[int]] = {name: [] for name in paths}
        for fn in paths.values():
            time_calls(fn, calls // 4)  # warm up: allocations, caches, branch predictors
        for round_index in range(rounds):
            order = list(paths.items())
            if round_index % 2:
                order.reverse()
            for name, fn in order:
                samples[name] += time_calls(fn, calls)
        for name, got in samples.items():
            out[f"{name}_b{batch}"] = {"p50": pct(got, 0.50), "p99": pct(got, 0.99)}
    host.close_all()
    return out


# --- (b) HTTP: servers in subprocesses ------------------------------------------------------------


def handwritten_app(models_dir: Path) -> FastAPI:
    """What someone would write by hand: FastAPI + the runtimes, no validation, no registry."""
    from ai_edge_litert.interpreter import Interpreter

    session = raw_onnx_session(models_dir / "classifier.onnx")
    interpreter = Interpreter(model_path=str(models_dir / "classifier.tflite"), num_threads=1)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    allocated = [list(inp["shape"])]
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body = json.loads(await request.body())
        tensor = body["inputs"][0]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        if name == ONNX_MODEL:
            y = session.run(None, {tensor["name"]: x})[0]
        else:
            if list(x.shape) != allocated[0]:
                interpreter.resize_tensor_input(inp["index"], x.shape)
                interpreter.allocate_tensors()
                allocated[0] = list(x.shape)
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()
            y = interpreter.get_tensor(out["index"])
        response = {
            "model_name": name,
            "outputs": [{"name": OUTPUT_NAME, "shape": list(y.shape), "datatype": "FP32", "data": y.ravel().tolist()}],
        }
        return Response(json.dumps(response).encode(), media_type="application/json")

    return app


def serve(kind: str, port: int, models_dir: Path) -> None:
    """Subprocess entry point: run one server until killed."""
    import uvicorn

    if kind == "handwritten":
        app = handwritten_app(models_dir)
    else:
        from edgefleet.agent.config import BatchingConfig
        from edgefleet.agent.serving.v2_api import create_inference_app

        models = {"onnx": models_dir / "classifier.onnx", "tflite": models_dir / "classifier.tflite"}
        batching = BatchingConfig(enabled=True) if kind == "agent-batched" else None
        app = create_inference_app(load_host(models), batching=batching)
    # The settings Agent._start_api uses.
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def servers(kinds: list[str], models_dir: Path) -> Iterator[dict[str, str]]:
    """Start one server process per kind (in parallel); yield their base URLs."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        for kind in kinds:
            port = free_port()
            procs[kind] = subprocess.Popen(
                [sys.executable, __file__, "--serve", kind, "--port", str(port), "--models", str(models_dir)],
                cwd=ROOT,
            )
            urls[kind] = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        for kind, url in urls.items():
            while True:
                if procs[kind].poll() is not None:
                    raise RuntimeError(f"{kind} server exited with {procs[kind].returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not start in {SERVER_START_TIMEOUT_S} s")
                time.sleep(0.05)
        yield urls
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def infer_body(x: np.ndarray) -> bytes:
    return json.dumps(
        {"inputs": [{"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()


def check_answer(response: httpx.Response, reference: np.ndarray, where: str) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"{where}: HTTP {response.status_code}: {response.text[:300]}")
    output = response.json()["outputs"][0]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, reference, atol=1e-5, err_msg=where)


def bench_http(
    urls: dict[str, str], models: dict[str, Path], rounds: int, requests: int
) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Sequential JSON infer latency per (runtime, server): p50/p99 µs and requests/s."""
    x = np.random.default_rng(1).standard_normal((1, N_INPUTS)).astype(np.float32)
    reference = raw_onnx_session(models["onnx"]).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    body = infer_body(x)
    headers = {"content-type": "application/json"}
    out: dict[str, dict[str, float]] = {}
    round_ratios: dict[str, list[float]] = {}
    for runtime, model in (("onnx", ONNX_MODEL), ("litert", TFLITE_MODEL)):
        clients = {kind: httpx.Client(base_url=urls[kind], timeout=10) for kind in ("agent", "handwritten")}
        path = f"/v2/models/{model}/infer"
        for kind, client in clients.items():
            check_answer(client.post(path, content=body, headers=headers), reference, f"{kind} {model}")
            for _ in range(requests // 4):  # warm up the connection and both processes
                client.post(path, content=body, headers=headers)
        samples: dict[str, list[int]] = {kind: [] for kind in clients}
        ratios = []
        for round_index in range(rounds):
            order = list(clients.items())
            if round_index % 2:
                order.reverse()
            this_round = {}
            for kind, client in order:
                got = time_calls(post_once(client, path, body, headers), requests)
                samples[kind] += got
                this_round[kind] = pct(got, 0.5)
            ratios.append(this_round["agent"] / this_round["handwritten"])
        for kind, client in clients.items():
            client.close()
            got = samples[kind]
            out[f"{runtime}_{kind}"] = {
                "p50": pct(got, 0.50),
                "p99": pct(got, 0.99),
                "rps": len(got) / (sum(got) / 1e9),
            }
        round_ratios[runtime] = ratios
    return out, round_ratios


def post_once(client: httpx.Client, path: str, body: bytes, headers: dict[str, str]) -> Callable[[], object]:
    return lambda: client.post(path, content=body, headers=headers)


def concurrent_rps(url: str, threads: int, requests: int, body: bytes) -> float:
    """Requests/s of ``threads`` keep-alive clients posting ``requests`` each at once (ONNX)."""
    path = f"/v2/models/{ONNX_MODEL}/infer"
    headers = {"content-type": "application/json"}
    clients = [httpx.Client(base_url=url, timeout=30) for _ in range(threads)]
    for client in clients:
        client.post(path, content=body, headers=headers)
    start = threading.Barrier(threads + 1)
    failures: list[int] = []

    def work(client: httpx.Client) -> None:
        start.wait()
        for _ in range(requests):
            if client.post(path, content=body, headers=headers).status_code != 200:
                failures.append(1)

    workers = [threading.Thread(target=work, args=(client,)) for client in clients]
    for worker in workers:
        worker.start()
    start.wait()
    t0 = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - t0
    for client in clients:
        client.close()
    if failures:
        raise RuntimeError(f"{url}: {len(failures)} concurrent requests failed")
    return threads * requests / elapsed


def bench_concurrent(urls: dict[str, str], threads: int, requests: int) -> dict[str, float]:
    """Concurrent requests/s per server kind (ONNX, batch 1)."""
    body = infer_body(np.random.default_rng(2).standard_normal((1, N_INPUTS)).astype(np.float32))
    return {kind: concurrent_rps(url, threads, requests, body) for kind, url in urls.items()}


# --- main ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: well under a minute on 2 cores")
    parser.add_argument("--serve", choices=["agent", "agent-batched", "handwritten"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.models)
        return

    if args.quick:
        rounds, calls, http_rounds, http_requests, conc_threads, conc_requests = 6, 1000, 6, 150, 8, 40
    else:
        rounds, calls, http_rounds, http_requests, conc_threads, conc_requests = 10, 5000, 10, 600, 8, 150
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        models_dir = Path(tmp)
        models = write_demo_models(models_dir)
        with servers(["agent", "handwritten", "agent-batched"], models_dir) as urls:
            local = bench_in_process(models, rounds, calls)
            http, round_ratios = bench_http(urls, models, http_rounds, http_requests)
            concurrent = bench_concurrent(
                {"inline": urls["agent"], "batched": urls["agent-batched"]}, conc_threads, conc_requests
            )

    results: dict[str, float] = {}
    baseline: dict[str, float] = {}
    for runtime, prefix in (("onnx", ""), ("litert", "litert_")):
        for batch in (1, 64):
            agent, raw = local[f"{runtime}_agent_b{batch}"], local[f"{runtime}_raw_b{batch}"]
            results[f"{prefix}p50_us_b{batch}"] = agent["p50"]
            results[f"{prefix}p99_us_b{batch}"] = agent["p99"]
            baseline[f"{prefix}raw_p50_us_b{batch}"] = raw["p50"]
            baseline[f"{prefix}raw_p99_us_b{batch}"] = raw["p99"]
        results[f"{prefix}overhead_us_b1"] = results[f"{prefix}p50_us_b1"] - baseline[f"{prefix}raw_p50_us_b1"]
        agent_http, hand_http = http[f"{runtime}_agent"], http[f"{runtime}_handwritten"]
        results[f"{prefix}http_p50_us"] = agent_http["p50"]
        results[f"{prefix}http_p99_us"] = agent_http["p99"]
        results[f"{prefix}http_rps"] = agent_http["rps"]
        baseline[f"{prefix}handwritten_http_p50_us"] = hand_http["p50"]
        baseline[f"{prefix}handwritten_http_p99_us"] = hand_http["p99"]
        baseline[f"{prefix}handwritten_http_rps"] = hand_http["rps"]
        results[f"{prefix}http_p50_ratio_round_min"] = min(round_ratios[runtime])
        results[f"{prefix}http_p50_ratio_round_max"] = max(round_ratios[runtime])
    results["http_concurrent_rps_inline"] = concurrent["inline"]
    results["http_concurrent_rps_batched"] = concurrent["batched"]
    results["nproc"] = float(os.cpu_count() or 0)
    results["elapsed_s"] = time.monotonic() - started
    ratio = {
        "b64": results["p50_us_b64"] / baseline["raw_p50_us_b64"],
        "litert_b64": results["litert_p50_us_b64"] / baseline["litert_raw_p50_us_b64"],
        "http_p50": results["http_p50_us"] / baseline["handwritten_http_p50_us"],
        "http_rps": results["http_rps"] / baseline["handwritten_http_rps"],
        "litert_http_p50": results["litert_http_p50_us"] / baseline["litert_handwritten_http_p50_us"],
        "litert_http_rps": results["litert_http_rps"] / baseline["litert_handwritten_http_rps"],
    }
    goal_met = (
        results["overhead_us_b1"] <= GOAL_OVERHEAD_US_B1
        and ratio["b64"] <= GOAL_RATIO_B64
        and ratio["http_p50"] <= GOAL_RATIO_HTTP_P50
    )

    print(f"inference benchmark: demo MLP 32-64-64-4, {os.cpu_count()} CPUs ({cpu_model()}), "
          f"Python {platform.python_version()}, {'quick' if args.quick else 'full'} run")  # fmt: skip
    print(f"{'in-process (µs)':<26} {'agent p50':>10} {'p99':>8}   {'raw p50':>8} {'p99':>8}  "
          f"{'agent-raw':>9} {'ratio':>6}")  # fmt: skip
    for runtime, prefix in (("onnx", ""), ("litert", "litert_")):
        for batch in (1, 64):
            a50, a99 = results[f"{prefix}p50_us_b{batch}"], results[f"{prefix}p99_us_b{batch}"]
            r50, r99 = baseline[f"{prefix}raw_p50_us_b{batch}"], baseline[f"{prefix}raw_p99_us_b{batch}"]
            print(f"{runtime + ' batch ' + str(batch):<26} {a50:>10.1f} {a99:>8.1f}   {r50:>8.1f} {r99:>8.1f}  "
                  f"{a50 - r50:>9.1f} {a50 / r50:>6.2f}")  # fmt: skip
    print(f"{'HTTP JSON, batch 1':<26} {'agent p50':>10} {'p99':>8} {'req/s':>7}   "
          f"{'hand p50':>8} {'p99':>8} {'req/s':>7}  {'p50 ratio (rounds)':>22}")  # fmt: skip
    for runtime, prefix in (("onnx", ""), ("litert", "litert_")):
        r, b = {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}, baseline
        print(f"{runtime:<26} {r['http_p50_us']:>10.0f} {r['http_p99_us']:>8.0f} {r['http_rps']:>7.0f}   "
              f"{b[prefix + 'handwritten_http_p50_us']:>8.0f} {b[prefix + 'handwritten_http_p99_us']:>8.0f} "
              f"{b[prefix + 'handwritten_http_rps']:>7.0f}  {ratio[prefix + 'http_p50']:>6.3f} "
              f"({r['http_p50_ratio_round_min']:.3f}..{r['http_p50_ratio_round_max']:.3f})")  # fmt: skip
    print(f"concurrent HTTP, {conc_threads} clients, ONNX: {concurrent['inline']:.0f} req/s inline, "
          f"{concurrent['batched']:.0f} req/s with dynamic batching (default 32 rows, 500 µs)")
    print("noise: on a shared 2-core VM absolute numbers move by tens of percent between runs (other load);"
          " compare agent and baseline within a run. HTTP p50 ratio spread across rounds shown in brackets.")
    print(f"goal (overhead_us_b1 <= {GOAL_OVERHEAD_US_B1:g}, ratio.b64 <= {GOAL_RATIO_B64:g}, "
          f"ratio.http_p50 <= {GOAL_RATIO_HTTP_P50:g}) met: {goal_met}")  # fmt: skip
    print(json.dumps({"bench": "inference", "results": results, "baseline": baseline, "ratio": ratio,
                      "goal_met": goal_met}))  # fmt: skip


if __name__ == "__main__":
    main()
