"""The v2 inference REST API over real ONNX and TFLite models, through httpx's ASGI transport.

Not Starlette's TestClient: with this Starlette it warns that it wants ``httpx2``, and warnings are
errors here. ASGITransport re-raises any exception the app lets escape, so an unhandled error
(a 500) fails the test instead of passing as a status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from fastapi import FastAPI
from onnx import TensorProto, helper, numpy_helper

from agent.inference_api import create_inference_app, decode_infer_request
from agent.runtimes import LoadedModel, load_model
from shared.errors import MessageError

WEIGHTS = np.array(
    [[0.5, -1.0, 0.25], [1.5, 0.0, -0.5], [-0.75, 2.0, 1.0], [0.1, 0.3, -1.2]],
    dtype=np.float32,
)
TFLITE_FEATURES = 8


def build_onnx() -> bytes:
    """input float32 [batch, 4] -> MatMul(WEIGHTS) -> Softmax -> probabilities [batch, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(WEIGHTS, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Client:
    """A synchronous facade over ``httpx.AsyncClient`` + ``ASGITransport``, so tests stay plain."""

    def __init__(self, app: FastAPI) -> None:
        self._runner = asyncio.Runner()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://agent")

    def get(self, path: str) -> httpx.Response:
        return self._runner.run(self._client.get(path))

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._runner.run(self._client.post(path, **kwargs))

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        self._runner.close()


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[Client]:
    client = Client(app)
    try:
        yield client
    finally:
        client.close()


class DictRegistry:
    """The ModelRegistry the API is written against, over a plain dict."""

    def __init__(self, models: list[LoadedModel]) -> None:
        self._models = {(model.name, model.version): model for model in models}

    def get(self, name: str, version: str | None = None) -> LoadedModel | None:
        if version is not None:
            return self._models.get((name, version))
        candidates = [model for (n, _), model in self._models.items() if n == name]
        return max(candidates, key=lambda model: model.version) if candidates else None

    def models(self) -> list[LoadedModel]:
        return list(self._models.values())


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from control_plane.demo_models import build_tflite_mlp, make_mlp_weights

    directory = tmp_path_factory.mktemp("models")
    paths = {"onnx": directory / "tiny.onnx", "tflite": directory / "mlp.tflite"}
    paths["onnx"].write_bytes(build_onnx())
    weights = make_mlp_weights(n_inputs=TFLITE_FEATURES, hidden=(16,), n_outputs=3, seed=3)
    paths["tflite"].write_bytes(build_tflite_mlp(weights))
    return paths


@pytest.fixture(scope="module")
def registry(model_files: dict[str, Path]) -> Iterator[DictRegistry]:
    models = [
        load_model("onnx", model_files["onnx"], name="tiny", version="1"),
        load_model("tflite", model_files["tflite"], name="mlp", version="2"),
    ]
    yield DictRegistry(models)
    for model in models:
        model.close()


@pytest.fixture(scope="module")
def client(registry: DictRegistry) -> Iterator[Client]:
    with serve(create_inference_app(registry, server_name="edge-test", server_version="9.9")) as api_client:
        yield api_client


def direct_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": x})[0]


def direct_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    interpreter = Interpreter(model_path=str(path))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], x.shape, strict=True)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def infer_body(x: np.ndarray, *, name: str = "input", datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}],
        **extra,
    }


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# --- health and metadata ------------------------------------------------------------------------


def test_health(client: Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    response = client.get("/v2/health/ready")
    assert response.status_code == 200 and response.json() == {"ready": True}


def test_ready_without_models() -> None:
    with serve(create_inference_app(DictRegistry([]))) as empty:
        assert empty.get("/v2/health/ready").status_code == 200
        assert_error(empty.get("/v2/models/tiny"), 404, "'tiny'")


def test_server_metadata(client: Client) -> None:
    response = client.get("/v2")
    assert response.status_code == 200
    assert response.json() == {"name": "edge-test", "version": "9.9", "extensions": ["binary_tensor_data"]}


@pytest.mark.parametrize("path", ["/v2/models/tiny", "/v2/models/tiny/versions/1"])
def test_onnx_model_metadata(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.json() == {
        "name": "tiny",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
    }


def test_tflite_model_metadata(client: Client) -> None:
    response = client.get("/v2/models/mlp/versions/2")
    assert response.status_code == 200
    body = response.json()
    assert body["platform"] == "tensorflow_lite" and body["versions"] == ["2"]
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, TFLITE_FEATURES]}]
    assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]


@pytest.mark.parametrize("path", ["/v2/models/tiny/ready", "/v2/models/tiny/versions/1/ready", "/v2/models/mlp/ready"])
def test_model_ready(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.json()["ready"] is True


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        ("/v2/models/nope", ("model 'nope' not found",)),
        ("/v2/models/nope/ready", ("model 'nope' not found",)),
        ("/v2/models/tiny/versions/7", ("'tiny'", "no version '7'")),
        ("/v2/models/tiny/versions/7/ready", ("no version '7'",)),
    ],
)
def test_unknown_model_or_version_is_404(client: Client, path: str, fragments: tuple[str, ...]) -> None:
    assert_error(client.get(path), 404, *fragments)


# --- infer: results ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_infer_matches_direct_session(client: Client, model_files: dict[str, Path], batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
    response = client.post("/v2/models/tiny/infer", json=infer_body(x, id="req-1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "tiny" and body["model_version"] == "1" and body["id"] == "req-1"
    (output,) = body["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [batch, 3]
    assert len(output["data"]) == batch * 3  # flat
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, direct_onnx(model_files["onnx"], x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 8])
def test_tflite_infer_matches_direct_interpreter(client: Client, model_files: dict[str, Path], batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, TFLITE_FEATURES)).astype(np.float32)
    response = client.post("/v2/models/mlp/versions/2/infer", json=infer_body(x))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "mlp" and body["model_version"] == "2" and "id" not in body
    (output,) = body["outputs"]
    assert output["shape"] == [batch, 3]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, direct_tflite(model_files["tflite"], x), rtol=0, atol=1e-6)


def test_nested_data_and_integer_values(client: Client, model_files: dict[str, Path]) -> None:
    x = np.array([[1, 0, -2, 3], [0, 1, 1, 0]], dtype=np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [[1, 0, -2, 3], [0, 1, 1, 0]]}]}
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(got, direct_onnx(model_files["onnx"], x), rtol=0, atol=1e-6)


def test_requested_outputs(client: Client) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    response = client.post("/v2/models/tiny/infer", json=infer_body(x, outputs=[{"name": "probabilities"}]))
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["probabilities"]


def test_raw_bytes_without_json_content_type(client: Client) -> None:
    # The body is parsed as JSON whatever the client declares (curl -d sends form encoding).
    x = np.zeros((1, 4), dtype=np.float32)
    response = client.post(
        "/v2/models/tiny/infer",
        content=json.dumps(infer_body(x)).encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text


# --- infer: client mistakes ----------------------------------------------------------------------


def one_input(**override: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4], **override}
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    ("body", "status", "fragments"),
    [
        (one_input(name="pixels"), 400, ("missing input 'input'", "got ['pixels']")),
        ({"inputs": one_input()["inputs"] + one_input(name="extra")["inputs"]}, 400, ("unknown input(s) ['extra']",)),
        (one_input(datatype="FP64"), 400, ("'input'", "FP64", "expected FP32")),
        (one_input(datatype="BYTES"), 400, ("unsupported datatype 'BYTES'",)),
        (one_input(shape=[1, 5], data=[0.0] * 5), 400, ("shape [1, 5]", "expected [-1, 4]")),
        (one_input(shape=[4], data=[0.0] * 4), 400, ("shape [4]",)),
        (one_input(shape=[2, 4]), 400, ("4 values", "shape [2, 4] needs 8")),
        (one_input(shape=[1, -4]), 400, ("'shape'",)),
        (one_input(shape="1x4"), 400, ("'shape'",)),
        (one_input(data=[[0.1, 0.2], [0.3]]), 400, ("ragged",)),
        (one_input(data=[0.1, None, 0.3, 0.4]), 400, ("FP32 data must be numbers",)),
        (one_input(data=["0.1", "0.2", "0.3", "0.4"]), 400, ("FP32 data must be numbers",)),
        (one_input(data=[True, False, True, False]), 400, ("FP32 data must be numbers",)),
        (one_input(data=[1e39, 0, 0, 0]), 400, ("out of range for FP32",)),
        (one_input(data=[{"a": 1}, 0, 0, 0]), 400, ("'input'",)),
        (one_input(data="0.1,0.2"), 400, ("'data' must be a list",)),
        (one_input(data=None, parameters={"binary_data_size": 16}), 400,
         ("binary_data_size needs the Inference-Header-Content-Length header",)),
        ({"inputs": []}, 400, ("'inputs' must be a non-empty list",)),
        ({"inputs": {"name": "input"}}, 400, ("'inputs' must be a non-empty list",)),
        ({"inputs": ["input"]}, 400, ("inputs[0] must be an object",)),
        ({}, 400, ("'inputs'",)),
        ([], 400, ("expected a JSON object",)),
        ({**one_input(), "id": 7}, 400, ("'id' must be a string",)),
        ({**one_input(), "outputs": [{"name": "logits"}]}, 400, ("no output 'logits'",)),
        ({**one_input(), "outputs": "probabilities"}, 400, ("'outputs' must be a list",)),
        ({**one_input(), "outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]}, 400,
         ("'binary_data' must be true or false",)),
        ({**one_input(), "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}, 400,
         ("classification extension is not supported",)),
        ({**one_input(), "parameters": {"binary_data_output": 1}}, 400, ("'binary_data_output' must be true or false",)),
        ({**one_input(), "parameters": []}, 400, ("'parameters' must be an object",)),
        ({"inputs": one_input()["inputs"] * 2}, 400, ("given twice",)),
    ],
)  # fmt: skip
def test_bad_infer_request_is_400(client: Client, body: object, status: int, fragments: tuple[str, ...]) -> None:
    assert_error(client.post("/v2/models/tiny/infer", json=body), status, *fragments)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b"\xff\xfe\x00", b'{"inputs": [' * 3000 + b"]" * 3000, b"[" * 100_000, b"null", b"42"],
)
def test_malformed_body_is_400(client: Client, raw: bytes) -> None:
    response = client.post("/v2/models/tiny/infer", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_deeply_nested_data_is_400(client: Client) -> None:
    raw = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ' + b"[" * 500 + b"]" * 500
    raw += b"}]}"
    assert_error(client.post("/v2/models/tiny/infer", content=raw), 400, "'input'")


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        ("/v2/models/nope/infer", ("model 'nope' not found",)),
        ("/v2/models/tiny/versions/2/infer", ("no version '2'",)),
        ("/v2/models/mlp/versions/1/infer", ("no version '1'",)),
    ],
)
def test_infer_unknown_model_or_version_is_404(client: Client, path: str, fragments: tuple[str, ...]) -> None:
    assert_error(client.post(path, json=one_input()), 404, *fragments)


def test_body_over_the_limit_is_413(registry: DictRegistry) -> None:
    with serve(create_inference_app(registry, max_request_bytes=200)) as small:
        big = one_input(data=[0.123456789] * 4)
        big["id"] = "x" * 300
        assert_error(small.post("/v2/models/tiny/infer", json=big), 413, "200-byte limit")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
            yield json.dumps(big).encode()

        assert_error(small.post("/v2/models/tiny/infer", content=chunks()), 413, "200-byte limit")
        assert small.post("/v2/models/tiny/infer", json=one_input()).status_code == 200


def test_unknown_route_and_wrong_method(client: Client) -> None:
    assert_error(client.get("/v2/nothing/here"), 404)
    response = client.get("/v2/models/tiny/infer")
    assert_error(response, 405)
    assert "POST" in response.headers["allow"]


def test_a_bug_is_a_500_with_the_error_shape(registry: DictRegistry) -> None:
    class Broken(DictRegistry):
        def get(self, name: str, version: str | None = None) -> LoadedModel | None:
            raise RuntimeError("bug")

    app = create_inference_app(Broken([]))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as raw_client:
            return await raw_client.get("/v2/models/tiny")

    response = asyncio.run(call())
    assert response.status_code == 500 and response.json() == {"error": "internal error: RuntimeError"}


# --- the codec on its own: conversions JSON cannot show through the FP32 models above ----------


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("INT8", [-128, 127], np.array([-128, 127], dtype=np.int8)),
        ("UINT64", [2**64 - 1], np.array([2**64 - 1], dtype=np.uint64)),
        ("BOOL", [True, False], np.array([True, False])),
        ("FP16", [0.5, 2], np.array([0.5, 2.0], dtype=np.float16)),
        ("FP64", [0.1], np.array([0.1])),
        ("INT32", [], np.zeros(0, dtype=np.int32)),
    ],
)
def test_decode_converts_exactly(datatype: str, data: list[Any], expected: np.ndarray) -> None:
    body = json.dumps({"inputs": [{"name": "t", "shape": [len(data)], "datatype": datatype, "data": data}]})
    (array,) = decode_infer_request(body.encode(), 1 << 20).inputs.values()
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize(
    ("datatype", "data", "fragment"),
    [
        ("INT8", [128], "out of range for INT8"),
        ("UINT8", [-1], "out of range for UINT8"),
        ("INT64", [2**64], "INT64 data must be integers"),
        ("INT32", [1.5], "INT32 data must be integers"),
        ("INT32", [True], "INT32 data must be integers"),
        ("BOOL", [1, 0], "BOOL data must be true/false"),
        ("FP16", [70000.0], "out of range for FP16"),
    ],
)
def test_decode_refuses_lossy_conversions(datatype: str, data: list[Any], fragment: str) -> None:
    body = json.dumps({"inputs": [{"name": "t", "shape": [len(data)], "datatype": datatype, "data": data}]})
    with pytest.raises(MessageError, match=fragment):
        decode_infer_request(body.encode(), 1 << 20)
