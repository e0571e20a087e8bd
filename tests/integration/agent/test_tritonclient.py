"""The agent's v2 API driven by an unmodified third-party client: NVIDIA's ``tritonclient[http]``.

The API runs under uvicorn on a real socket, over the agent's own ``ModelHost`` holding the demo
MLP as ONNX and as TFLite; answers are compared with onnxruntime and LiteRT called directly on
the same files. Every test runs twice: requests inline (the default) and through the dynamic
batcher.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import uvicorn
from support.runtimes import direct_tflite
from tritonclient.utils import InferenceServerException

from edgefleet.agent.config import BatchingConfig
from edgefleet.agent.serving.host import ModelHost
from edgefleet.agent.serving.v2_api import create_inference_app
from edgefleet.control_plane.devtools.demo_models import INPUT_NAME, OUTPUT_NAME, write_demo_models
from edgefleet.shared.runtimes import load_model

ONNX = ("classifier-onnx", "1.0.0")
TFLITE = ("classifier-tflite", "2.0.0")
N_INPUTS, N_OUTPUTS = 32, 4  # the demo MLP


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_models(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture(scope="module")
def host(model_files: dict[str, Path]) -> Iterator[ModelHost]:
    host = ModelHost()
    host.swap(ONNX[0], load_model("onnx", model_files["onnx"], name=ONNX[0], version=ONNX[1]))
    host.swap(TFLITE[0], load_model("tflite", model_files["tflite"], name=TFLITE[0], version=TFLITE[1]))
    yield host
    host.close_all()


@pytest.fixture(scope="module", params=["inline", "batched"])
def url(request: pytest.FixtureRequest, host: ModelHost) -> Iterator[str]:
    """A uvicorn server on a free port, in a thread, as ``Agent`` runs it."""
    batching = None
    if request.param == "batched":
        batching = BatchingConfig(enabled=True, max_batch_size=16, max_queue_delay_us=1000)
    app = create_inference_app(host, server_name="edge-triton-test", batching=batching)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=url, concurrency=4, connection_timeout=10, network_timeout=10)
    yield client
    client.close()


def direct(runtime: str, model_files: dict[str, Path], x: np.ndarray) -> np.ndarray:
    if runtime == "onnx":
        session = ort.InferenceSession(str(model_files["onnx"]), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return direct_tflite(model_files["tflite"], x)


def make_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


# --- health and metadata ------------------------------------------------------------------------


def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "edge-triton-test"
    assert "binary_tensor_data" in metadata["extensions"]


@pytest.mark.parametrize(("name", "version", "platform"), [(*ONNX, "onnxruntime_onnx"), (*TFLITE, "tensorflow_lite")])
def test_model_metadata_and_readiness(
    client: triton.InferenceServerClient, name: str, version: str, platform: str
) -> None:
    expected = {
        "name": name,
        "versions": [version],
        "platform": platform,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, N_INPUTS]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, N_OUTPUTS]}],
    }
    assert client.get_model_metadata(name) == expected
    assert client.get_model_metadata(name, model_version=version) == expected
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, model_version=version)
    assert not client.is_model_ready(name, model_version="9.9.9")
    assert not client.is_model_ready("no-such-model")


# --- infer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False), (False, True)])
def test_infer_matches_the_runtime_called_directly(
    client: triton.InferenceServerClient, model_files: dict[str, Path], runtime: str, binary_in: bool, binary_out: bool
) -> None:
    name, version = ONNX if runtime == "onnx" else TFLITE
    x = np.random.default_rng(7).standard_normal((5, N_INPUTS)).astype(np.float32)
    outputs = [triton.InferRequestedOutput(OUTPUT_NAME, binary_data=binary_out)]
    result = client.infer(name, [make_input(x, binary_in)], model_version=version, outputs=outputs, request_id="r-7")
    response = result.get_response()
    assert response["model_name"] == name and response["model_version"] == version and response["id"] == "r-7"
    (output,) = response["outputs"]
    assert ("parameters" in output) is binary_out and ("data" in output) is not binary_out
    got = result.as_numpy(OUTPUT_NAME)
    assert got.dtype == np.float32 and got.shape == (5, N_OUTPUTS)
    np.testing.assert_allclose(got, direct(runtime, model_files, x), rtol=0, atol=1e-6)


def test_infer_without_requested_outputs_returns_all_as_binary(
    client: triton.InferenceServerClient, model_files: dict[str, Path]
) -> None:
    # tritonclient then sends "binary_data_output": true for the request as a whole.
    x = np.random.default_rng(8).standard_normal((1, N_INPUTS)).astype(np.float32)
    result = client.infer(ONNX[0], [make_input(x, binary=True)])
    assert result.get_output(OUTPUT_NAME)["parameters"]["binary_data_size"] == N_OUTPUTS * 4
    np.testing.assert_allclose(result.as_numpy(OUTPUT_NAME), direct("onnx", model_files, x), rtol=0, atol=1e-6)


def test_concurrent_async_infer_each_gets_its_own_answer(
    client: triton.InferenceServerClient, model_files: dict[str, Path]
) -> None:
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((1 + i % 3, N_INPUTS)).astype(np.float32) for i in range(24)]
    pending = [client.async_infer(ONNX[0], [make_input(x, binary=i % 2 == 0)]) for i, x in enumerate(xs)]
    session = ort.InferenceSession(str(model_files["onnx"]), providers=["CPUExecutionProvider"])
    for x, request in zip(xs, pending, strict=True):
        got = request.get_result(timeout=10).as_numpy(OUTPUT_NAME)
        np.testing.assert_allclose(got, session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], rtol=0, atol=1e-6)


# --- errors arrive as InferenceServerException ----------------------------------------------------


def test_unknown_model_and_version(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, N_INPUTS), dtype=np.float32)
    with pytest.raises(InferenceServerException) as info:
        client.infer("no-such-model", [make_input(x, binary=True)])
    assert info.value.status() == "404" and "model 'no-such-model' not found" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer(ONNX[0], [make_input(x, binary=False)], model_version="9.9.9")
    assert info.value.status() == "404" and "no version '9.9.9'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no-such-model")
    assert info.value.status() == "404"


@pytest.mark.parametrize("binary", [False, True])
def test_wrong_shape_and_datatype(client: triton.InferenceServerClient, binary: bool) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.infer(TFLITE[0], [make_input(np.zeros((2, N_INPUTS + 1), dtype=np.float32), binary)])
    assert info.value.status() == "400" and "shape [2, 33]" in info.value.message()
    wrong = triton.InferInput(INPUT_NAME, [1, N_INPUTS], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, N_INPUTS)), binary_data=binary)
    with pytest.raises(InferenceServerException) as info:
        client.infer(ONNX[0], [wrong])
    assert info.value.status() == "400" and "datatype FP64, expected FP32" in info.value.message()


def test_bytes_tensors_are_refused_clearly(client: triton.InferenceServerClient) -> None:
    strings = triton.InferInput(INPUT_NAME, [1], "BYTES")
    strings.set_data_from_numpy(np.array([b"hello"], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as info:
        client.infer(ONNX[0], [strings])
    assert info.value.status() == "400" and "unsupported datatype 'BYTES'" in info.value.message()
