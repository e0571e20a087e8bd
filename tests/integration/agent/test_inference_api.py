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
from fastapi import FastAPI
from onnx import TensorProto, helper, numpy_helper
from support.runtimes import direct_tflite

from edgefleet.agent.config import BatchingConfig
from edgefleet.agent.serving.v2_api import create_inference_app, decode_infer_request, encode_infer_response
from edgefleet.shared.errors import MessageError
from edgefleet.shared.runtimes import LoadedModel, load_model

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
    from edgefleet.control_plane.devtools.demo_models import build_tflite_mlp, make_mlp_weights

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
        ({**one_input(), "parameters": {"binary_data_output": 1}}, 400,
         ("'binary_data_output' must be true or false",)),
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

    async def infer() -> httpx.Response:  # the infer fast path, which skips FastAPI's router
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as raw_client:
            return await raw_client.post("/v2/models/tiny/infer", json=one_input())

    response = asyncio.run(infer())
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


# --- binary tensor data extension ----------------------------------------------------------------

BINARY_HEADER = "inference-header-content-length"


def binary_request(
    tensors: list[tuple[str, np.ndarray]], *, pad: int = 0, tail: bytes = b"", **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """A JSON header (padded with ``pad`` spaces) followed by each tensor's raw bytes."""
    inputs = [
        {"name": name, "shape": list(array.shape), "datatype": "FP32", "parameters": {"binary_data_size": array.nbytes}}
        for name, array in tensors
    ]
    header = json.dumps({"inputs": inputs, **extra}).encode() + b" " * pad
    body = header + b"".join(array.astype("<f4").tobytes() for _, array in tensors) + tail
    return body, {BINARY_HEADER: str(len(header)), "content-type": "application/octet-stream"}


def split_response(response: httpx.Response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON header and each binary output as an array, read as a Triton client would."""
    length = int(response.headers[BINARY_HEADER])
    header = json.loads(response.content[:length])
    arrays: dict[str, np.ndarray] = {}
    offset = length
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            continue
        raw = response.content[offset : offset + size]
        arrays[output["name"]] = np.frombuffer(raw, dtype="<f4").reshape(output["shape"])
        offset += size
    assert offset == len(response.content), "trailing bytes after the binary outputs"
    return header, arrays


@pytest.mark.parametrize("pad", [0, 1, 3])  # 1 and 3: the tensor starts at an unaligned offset
def test_onnx_binary_in_binary_out_matches_direct_session(
    client: Client, model_files: dict[str, Path], pad: int
) -> None:
    x = np.random.default_rng(pad).standard_normal((6, 4)).astype(np.float32)
    body, headers = binary_request(
        [("input", x)], pad=pad, id="b-1", outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}]
    )
    response = client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header, arrays = split_response(response)
    assert header["id"] == "b-1" and header["model_name"] == "tiny"
    (output,) = header["outputs"]
    assert output == {
        "name": "probabilities", "shape": [6, 3], "datatype": "FP32", "parameters": {"binary_data_size": 6 * 3 * 4}
    }  # fmt: skip
    np.testing.assert_array_equal(arrays["probabilities"], direct_onnx(model_files["onnx"], x))


def test_binary_in_json_out(client: Client, model_files: dict[str, Path]) -> None:
    x = np.random.default_rng(11).standard_normal((2, 4)).astype(np.float32)
    body, headers = binary_request([("input", x)])
    response = client.post("/v2/models/tiny/versions/1/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert BINARY_HEADER not in response.headers and response.headers["content-type"] == "application/json"
    (output,) = response.json()["outputs"]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_array_equal(got, direct_onnx(model_files["onnx"], x))


def test_json_in_binary_out_for_every_output(client: Client, model_files: dict[str, Path]) -> None:
    x = np.random.default_rng(12).standard_normal((3, TFLITE_FEATURES)).astype(np.float32)
    response = client.post("/v2/models/mlp/infer", json=infer_body(x, parameters={"binary_data_output": True}))
    assert response.status_code == 200, response.text
    _, arrays = split_response(response)
    np.testing.assert_array_equal(arrays["probabilities"], direct_tflite(model_files["tflite"], x))


def test_per_output_flag_overrides_binary_data_output(client: Client) -> None:
    x = np.zeros((1, 4), dtype=np.float32)
    body = infer_body(
        x,
        parameters={"binary_data_output": True},
        outputs=[{"name": "probabilities", "parameters": {"binary_data": False}}],
    )
    response = client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 200 and BINARY_HEADER not in response.headers
    assert len(response.json()["outputs"][0]["data"]) == 3


def test_tflite_binary_matches_direct_interpreter(client: Client, model_files: dict[str, Path]) -> None:
    x = np.random.default_rng(13).standard_normal((4, TFLITE_FEATURES)).astype(np.float32)
    body, headers = binary_request([("input", x)], parameters={"binary_data_output": True})
    response = client.post("/v2/models/mlp/versions/2/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    _, arrays = split_response(response)
    np.testing.assert_array_equal(arrays["probabilities"], direct_tflite(model_files["tflite"], x))


def _bad_binary_requests() -> list[tuple[bytes, dict[str, str], str]]:
    x = np.zeros((1, 4), dtype=np.float32)
    good, headers = binary_request([("input", x)])
    length = int(headers[BINARY_HEADER])
    short, short_headers = binary_request([("input", x)])
    short = short[:-4]
    extra, extra_headers = binary_request([("input", x)], tail=b"\0")
    wrong_size = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}
    ).encode()
    both = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0],
                     "parameters": {"binary_data_size": 16}}]}
    ).encode()  # fmt: skip
    size_type = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": "16"}}]}
    ).encode()
    strings = json.dumps(
        {"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]}
    ).encode()
    return [
        (good, {BINARY_HEADER: "abc"}, "Inference-Header-Content-Length must be a byte count"),
        (good, {BINARY_HEADER: "-3"}, "Inference-Header-Content-Length must be a byte count"),
        (good, {BINARY_HEADER: "9" * 5000}, "Inference-Header-Content-Length must be a byte count"),
        (good, {BINARY_HEADER: "0"}, "does not fit"),
        (good, {BINARY_HEADER: str(len(good) + 1)}, "does not fit"),
        (good, {BINARY_HEADER: str(length - 1)}, "not JSON"),
        (short, short_headers, "runs past the end of the body"),
        (extra, extra_headers, "17 bytes of binary data follow the JSON header, but the inputs' binary_data_size add"),
        (wrong_size + bytes(12), {BINARY_HEADER: str(len(wrong_size))}, "binary_data_size is 12 bytes but FP32 shape"),
        (both + bytes(16), {BINARY_HEADER: str(len(both))}, "either 'data' or binary_data_size"),
        (size_type + bytes(16), {BINARY_HEADER: str(len(size_type))}, "binary_data_size must be an int >= 0"),
        (strings + bytes(8), {BINARY_HEADER: str(len(strings))}, "unsupported datatype 'BYTES'"),
    ]


@pytest.mark.parametrize(("body", "headers", "fragment"), _bad_binary_requests())
def test_bad_binary_request_is_400(client: Client, body: bytes, headers: dict[str, str], fragment: str) -> None:
    assert_error(client.post("/v2/models/tiny/infer", content=body, headers=headers), 400, fragment)


def test_binary_body_over_the_limit_is_413(registry: DictRegistry) -> None:
    body, headers = binary_request([("input", np.zeros((64, 4), dtype=np.float32))])
    with serve(create_inference_app(registry, max_request_bytes=len(body) - 1)) as small:
        assert_error(small.post("/v2/models/tiny/infer", content=body, headers=headers), 413)


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("INT8", np.array([[-128, 127, 0]], dtype=np.int8)),
        ("UINT64", np.array([2**64 - 1, 3], dtype=np.uint64)),
        ("BOOL", np.array([True, False, True])),
        ("FP16", np.array([0.5, -2.0, 65504.0], dtype=np.float16)),
        ("FP64", np.array([[0.1], [np.pi]])),
        ("INT32", np.zeros((0, 2), dtype=np.int32)),
    ],
)
def test_decode_binary_is_exact(datatype: str, array: np.ndarray) -> None:
    header = json.dumps(
        {"inputs": [{"name": "t", "shape": list(array.shape), "datatype": datatype,
                     "parameters": {"binary_data_size": array.nbytes}}]}
    ).encode()  # fmt: skip
    # One space after the JSON: the tensor starts at an odd offset, misaligned for most dtypes.
    body = header + b" " + array.astype(array.dtype.newbyteorder("<")).tobytes()
    request = decode_infer_request(body, 1 << 20, len(header) + 1)
    decoded = request.inputs["t"]
    assert decoded.dtype is array.dtype and decoded.shape == array.shape  # native dtype: predict() accepts it
    np.testing.assert_array_equal(decoded, array)


def test_decode_binary_bool_must_be_0_or_1() -> None:
    header = json.dumps(
        {"inputs": [{"name": "t", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}]}
    ).encode()
    with pytest.raises(MessageError, match="BOOL bytes must be 0 or 1"):
        decode_infer_request(header + b"\x01\x02", 1 << 20, len(header))


def test_encode_binary_outputs_follow_the_header_in_order(registry: DictRegistry) -> None:
    model = registry.get("tiny")
    assert model is not None
    outputs = {"a": np.arange(3, dtype=np.int16), "b": np.array([[1.5]], dtype=np.float32), "c": np.array([True])}
    body, length = encode_infer_response(model, "r", outputs, ["c", "b", "a"], frozenset({"a", "c"}))
    assert length is not None
    header = json.loads(body[:length])
    assert [o["name"] for o in header["outputs"]] == ["c", "b", "a"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 1}
    assert header["outputs"][1]["data"] == [1.5] and "parameters" not in header["outputs"][1]
    assert body[length:] == b"\x01" + np.arange(3, dtype="<i2").tobytes()


# --- dynamic batching through the API ---------------------------------------------------------


def test_batched_requests_get_their_own_rows(registry: DictRegistry, model_files: dict[str, Path]) -> None:
    model = registry.get("tiny")
    assert model is not None
    seen_batches: list[int] = []
    real_predict = model.predict

    def spy(inputs: Any) -> dict[str, np.ndarray]:
        seen_batches.append(inputs["input"].shape[0])
        return real_predict(inputs)

    # A long delay and a batch size equal to the number of clients: the batch runs when full.
    config = BatchingConfig(enabled=True, max_batch_size=8, max_queue_delay_us=5_000_000, models=("tiny",))
    app = create_inference_app(registry, batching=config)
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1 + i % 2, 4)).astype(np.float32) for i in range(5)]  # 7 rows in all

    async def call_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as api_client:
            calls = [api_client.post("/v2/models/tiny/infer", json=infer_body(x, id=str(i))) for i, x in enumerate(xs)]
            # One more that fills the batch to 8 rows, sent as binary data.
            body, headers = binary_request([("input", np.ones((1, 4), dtype=np.float32))])
            calls.append(api_client.post("/v2/models/tiny/infer", content=body, headers=headers))
            return await asyncio.gather(*calls)

    model.predict = spy  # type: ignore[method-assign]
    try:
        responses = asyncio.run(asyncio.wait_for(call_all(), timeout=30))
    finally:
        del model.predict
    assert seen_batches == [8]  # one run for all six requests
    for i, (x, response) in enumerate(zip(xs, responses, strict=False)):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == str(i)
        got = np.asarray(body["outputs"][0]["data"], dtype=np.float32).reshape(body["outputs"][0]["shape"])
        np.testing.assert_allclose(got, direct_onnx(model_files["onnx"], x), rtol=0, atol=1e-6)
    got = np.asarray(responses[-1].json()["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(got, direct_onnx(model_files["onnx"], np.ones((1, 4), np.float32))[0], atol=1e-6)


def test_batching_applies_only_to_the_configured_models(registry: DictRegistry) -> None:
    # "mlp" is not listed, so its request runs inline at once despite the 5 s queue delay.
    config = BatchingConfig(enabled=True, max_batch_size=8, max_queue_delay_us=5_000_000, models=("tiny",))
    with serve(create_inference_app(registry, batching=config)) as batched:
        x = np.zeros((1, TFLITE_FEATURES), dtype=np.float32)
        response = batched.post("/v2/models/mlp/infer", json=infer_body(x))
        assert response.status_code == 200
        # A bad request to a batched model fails at once, alone, without waiting for a batch.
        assert_error(batched.post("/v2/models/tiny/infer", json=one_input(shape=[1, 5], data=[0.0] * 5)), 400)


def test_infer_under_a_root_path_goes_through_the_router(registry: DictRegistry, model_files: dict[str, Path]) -> None:
    # Behind a proxy that mounts the API under a prefix, the path carries the root path: the
    # fast path does not match it and FastAPI's routes answer, with the same handler.
    app = create_inference_app(registry)
    x = np.random.default_rng(21).standard_normal((2, 4)).astype(np.float32)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, root_path="/agent")
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as raw_client:
            return await raw_client.post("/agent/v2/models/tiny/versions/1/infer", json=infer_body(x))

    response = asyncio.run(call())
    assert response.status_code == 200, response.text
    got = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(got, direct_onnx(model_files["onnx"], x), rtol=0, atol=1e-6)
