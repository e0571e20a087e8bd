"""``edgefleet demo``: the whole product on one machine, checked end to end.

Starts the control plane (SQLite, embedded broker) and agents as separate processes, builds a
real ONNX model and a real TFLite model, publishes them as signed bundles, deploys both to
every agent, asks each agent's Open Inference Protocol API for predictions and checks them
against the same model run directly in onnxruntime / LiteRT. Exit code 0 only if every check
passed and every process stopped.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from edgefleet.control_plane.client import ADMIN_TOKEN_FILE
from edgefleet.control_plane.devtools.demo_models import INPUT_NAME, OUTPUT_NAME, make_mlp_weights, write_demo_models
from edgefleet.control_plane.devtools.local_fleet import LocalFleet
from edgefleet.shared.errors import EdgefleetError

MODELS = (("classifier", "onnx"), ("classifier-lite", "tflite"))
VERSION = "1.0.0"
TOLERANCE = 1e-5  # max abs difference between agent and direct runtime outputs
LATENCY_REQUESTS = 200  # per agent and model, for the p50


def direct_predict(runtime: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Run ``x`` through the model file directly in its runtime (the demo's reference)."""
    if runtime == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def v2_infer(http: httpx.Client, api_url: str, model: str, x: np.ndarray) -> np.ndarray:
    """Call an agent's KServe v2 infer endpoint with a JSON tensor."""
    body = {"inputs": [{"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = http.post(f"{api_url}/v2/models/{model}/infer", json=body)
    response.raise_for_status()
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def run_demo(*, workdir: Path | None, n_agents: int, console: Console, embedded_broker: str = "auto") -> int:
    """Run the demo; return the process exit code."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
            return _run(Path(tmp), n_agents, console, embedded_broker)
    workdir.mkdir(parents=True, exist_ok=True)
    return _run(workdir.resolve(), n_agents, console, embedded_broker)


def _run(workdir: Path, n_agents: int, console: Console, embedded_broker: str) -> int:
    started = time.monotonic()
    fleet = LocalFleet(workdir, embedded_broker=embedded_broker)
    failures: list[str] = []
    rows: list[tuple[str, ...]] = []
    try:
        with console.status("starting the control plane (SQLite, embedded broker)…"):
            client = fleet.start_control_plane()
        broker = fleet.info["broker"]
        console.print(
            f"[green]✓[/green] control plane {fleet.api_url}, {broker['kind']} broker on "
            f"{broker['host']}:{broker['port']}"
        )
        with httpx.Client(timeout=10.0) as anonymous:
            refused = anonymous.get(f"{fleet.api_url}/api/v1/devices").status_code
        if refused != 401:
            failures.append(f"the API answered a call without a token with {refused}, not 401")
        console.print(
            f"[green]✓[/green] the API refuses calls without a token ({refused}); the demo uses the admin "
            f"token the first start wrote to {fleet.control_plane_dir / ADMIN_TOKEN_FILE}"
        )

        paths = write_demo_models(workdir / "models")
        console.print(f"[green]✓[/green] built models: {', '.join(p.name for p in paths.values())}")

        device_ids = [f"demo-agent-{i + 1}" for i in range(n_agents)]
        with console.status(f"starting {n_agents} agents…"):
            for device_id in device_ids:
                fleet.start_agent(device_id)
            fleet.wait_for_devices(client, device_ids)
        console.print(f"[green]✓[/green] agents online: {', '.join(device_ids)}")

        for name, runtime in MODELS:
            published = client.push_model(paths[runtime], name=name, version=VERSION)
            console.print(
                f"[green]✓[/green] published {name}:{VERSION} ({runtime}), signed bundle "
                f"{published['bundle_size']} bytes, {published['bundle_digest'][:19]}…"
            )

        deploy_started = time.monotonic()
        ids = [d["id"] for name, _ in MODELS for d in client.deploy(name, VERSION, devices=device_ids)]
        with console.status("deploying to every agent…"):
            results = client.wait_for_deployments(ids, timeout_s=120)
        deploy_s = time.monotonic() - deploy_started
        for result in results:
            if result["status"] != "succeeded":
                failures.append(
                    f"deployment {result['model_name']} to {result['device_id']}: {result['status']} "
                    f"{result.get('message', '')}"
                )
        console.print(f"[green]✓[/green] {len(results)} deployments finished in {deploy_s:.2f} s")

        x = np.random.default_rng(7).standard_normal((8, make_mlp_weights().n_inputs)).astype(np.float32)
        with httpx.Client(timeout=10.0) as http:
            for device_id in device_ids:
                agent = fleet.agents[device_id]
                for name, runtime in MODELS:
                    got = v2_infer(http, agent.api_url, name, x)
                    expected = direct_predict(runtime, paths[runtime], x)
                    diff = float(np.max(np.abs(got - expected)))
                    latencies = []
                    one = x[:1]
                    for _ in range(LATENCY_REQUESTS):
                        t0 = time.perf_counter()
                        v2_infer(http, agent.api_url, name, one)
                        latencies.append(time.perf_counter() - t0)
                    ok = diff <= TOLERANCE
                    if not ok:
                        failures.append(f"{device_id} {name}: max |diff| {diff:.2e} > {TOLERANCE}")
                    rows.append(
                        (
                            device_id,
                            f"{name}:{VERSION}",
                            runtime,
                            f"{diff:.1e}",
                            f"{statistics.median(latencies) * 1e3:.2f} ms",
                            "[green]ok[/green]" if ok else "[red]MISMATCH[/red]",
                        )
                    )
    except (EdgefleetError, httpx.HTTPError, OSError) as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        with console.status("shutting down…"):
            codes = fleet.stop()
    leftovers = [name for name, code in codes.items() if code not in (0, -15)]
    for name in leftovers:
        failures.append(f"{name} exited with {codes[name]}")

    table = Table(
        "device", "model", "runtime", "max |agent - direct|", "HTTP infer p50", "check", title="edgefleet demo"
    )
    for row in rows:
        table.add_row(*row)
    console.print(table)
    wall = time.monotonic() - started
    if failures:
        for failure in failures:
            console.print(f"[red]✗[/red] {failure}")
        console.print(f"[red]demo failed[/red] after {wall:.1f} s; logs in {workdir / 'logs'}")
        return 1
    console.print(
        f"[green]demo passed[/green]: {len(rows)} model/agent pairs match their runtimes; "
        f"all processes stopped; {wall:.1f} s"
    )
    return 0
