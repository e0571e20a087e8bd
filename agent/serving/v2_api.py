"""The Open Inference Protocol (KServe v2) REST API of the agent, with binary tensor data.

https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/

Tensors travel as JSON or, with the binary tensor data extension as Triton defines it
(https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md),
as raw little-endian bytes after the JSON header: the ``Inference-Header-Content-Length``
header gives the JSON's length, each binary input says ``"parameters": {"binary_data_size": N}``,
and outputs asked for with ``"binary_data": true`` (or all of them, with the request parameter
``"binary_data_output": true``) come back the same way. BYTES tensors are refused either way.

The infer path parses the raw body with :func:`json.loads` and converts tensors with numpy,
with no pydantic models in between: validation is done once, against the model's signature,
by :meth:`LoadedModel.predict`. It does not go through FastAPI's router either: a small ASGI
layer in front of it answers ``POST .../infer`` itself and hands everything else to FastAPI.
Measured with ASGI calls in-process (demo MLP, batch 1, 2-core x86 under other load, p10), a
request took 110 µs ONNX / 80 µs TFLite this way against 242 / 195 µs through the FastAPI route
it replaced, and 175 / 139 µs in a minimal hand-written FastAPI server (``bench/inference.py``).

Every client mistake is answered ``{"error": "..."}`` with a 4xx status (400 malformed or
mismatched request, 404 unknown model or version, 413 body too large); a 500 means a bug or a
runtime failure, never a bad request.

With ``[batching]`` enabled, requests to a model it applies to are queued to that model's
:class:`~agent.batching.DynamicBatcher` and awaited, so the event loop decodes other requests
while a batch runs; otherwise (the default) the model runs inline on the event loop.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgefleet.agent.config import BatchingConfig
from edgefleet.agent.serving.batching import BatcherPool
from edgefleet.shared.errors import InferenceError, MessageError, NotFoundError, TooLargeError
from edgefleet.shared.runtimes.base import LoadedModel
from edgefleet.shared.tensors import MAX_RANK, NUMPY_TO_V2, V2_TO_NUMPY
from edgefleet.shared.wire.strict import loads_object

PLATFORMS: dict[str, str] = {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
EXTENSIONS: tuple[str, ...] = ("binary_tensor_data",)
BINARY_HEADER = "inference-header-content-length"
_BINARY_HEADER_B = BINARY_HEADER.encode()
_JSON = "application/json"
_JSON_B = b"application/json"
_OCTETS_B = b"application/octet-stream"
_INFER_PREFIX = "/v2/models/"
_INFER_SUFFIX = "/infer"

# Binary tensor data is little-endian on the wire. On little-endian hosts these are numpy's
# native dtype singletons, so decoded arrays pass LoadedModel.predict's identity check.
_LITTLE_ENDIAN = sys.byteorder == "little"
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    name: dtype if _LITTLE_ENDIAN else dtype.newbyteorder("<") for name, dtype in V2_TO_NUMPY.items()
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ModelRegistry(Protocol):
    """Where the API finds the models it serves; the agent's model manager implements it."""

    def get(self, name: str, version: str | None = None) -> LoadedModel | None:
        """Return the model, its default version if ``version`` is None, or None if not loaded."""
        ...

    def models(self) -> list[LoadedModel]:
        """Return every loaded model."""
        ...


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded infer request.

    Attributes:
        id: The client's request id, echoed in the response; None if it sent none.
        inputs: One array per input, by name, in the request's datatype and shape.
        output_names: The outputs asked for, in order; None means all of them.
        binary_outputs: The outputs to return as binary tensor data.
        all_binary: Return every output as binary data (``binary_data_output`` with no
            ``outputs`` list; with a list, its effect is already in ``binary_outputs``).
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    output_names: list[str] | None
    binary_outputs: frozenset[str] = frozenset()
    all_binary: bool = False


# --- Pure codec: bytes <-> arrays. No I/O, no framework. ------------------------------------


def parse_header_length(value: str | bytes | None) -> int | None:
    """Parse an ``Inference-Header-Content-Length`` header value (None if absent).

    Raises:
        MessageError: If it is not a non-negative decimal integer.
    """
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    # The length cap keeps int() away from huge digit strings (and their ValueError).
    if not text.isdigit() or not text.isascii() or len(text) > 19:
        raise MessageError(f"Inference-Header-Content-Length must be a byte count, got {text!r:.40}")
    return int(text)


def decode_infer_request(body: bytes, max_bytes: int, header_length: int | None = None) -> InferRequest:
    """Decode an infer request body: JSON, or a JSON header followed by binary tensor data.

    Args:
        body: The raw request body.
        max_bytes: The largest body accepted.
        header_length: The ``Inference-Header-Content-Length`` header: the JSON is
            ``body[:header_length]`` and the rest is binary tensor data. None: all JSON.

    Returns:
        The request, with each input converted to a numpy array of its declared datatype and
        shape. Whether those fit the model is :meth:`LoadedModel.predict`'s job.

    Raises:
        MessageError: If the body is not a well-formed v2 infer request.
    """
    binary: memoryview | None = None
    header = body
    if header_length is not None:
        if len(body) > max_bytes:
            raise MessageError(f"infer request: {len(body)} bytes, over the {max_bytes}-byte limit")
        if not 0 < header_length <= len(body):
            raise MessageError(
                f"Inference-Header-Content-Length {header_length} does not fit the {len(body)}-byte body"
            )
        header = body[:header_length]
        binary = memoryview(body)[header_length:]
    try:
        raw = loads_object(header, "infer request", max_bytes)
    except RecursionError as exc:
        # json.loads recurses per nesting level; a hostile body must not become a 500.
        raise MessageError("infer request: JSON nested too deeply") from exc
    request_id = raw.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise MessageError("infer request: 'id' must be a string")
    all_binary = False
    parameters = raw.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise MessageError("infer request: 'parameters' must be an object")
        all_binary = _flag(parameters, "binary_data_output", "infer request")
    raw_inputs = raw.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise MessageError("infer request: 'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0  # into the binary data, which holds the binary inputs in the order listed
    for position, raw_input in enumerate(raw_inputs):
        name, array, offset = _decode_input(raw_input, position, binary, offset)
        if name in inputs:
            raise MessageError(f"infer request: input {name!r} given twice")
        inputs[name] = array
    if binary is not None and offset != len(binary):
        raise MessageError(
            f"infer request: {len(binary)} bytes of binary data follow the JSON header, "
            f"but the inputs' binary_data_size add up to {offset}"
        )
    output_names, binary_outputs = _decode_outputs(raw.get("outputs"), all_binary)
    return InferRequest(
        id=request_id,
        inputs=inputs,
        output_names=output_names,
        binary_outputs=binary_outputs,
        all_binary=all_binary and output_names is None,
    )


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise MessageError(f"{where}: parameter {key!r} must be true or false")
    return value


def _decode_input(raw: object, position: int, binary: memoryview | None, offset: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(raw, dict):
        raise MessageError(f"inputs[{position}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise MessageError(f"inputs[{position}]: 'name' must be a non-empty string")
    datatype = raw.get("datatype")
    dtype = V2_TO_NUMPY.get(datatype) if isinstance(datatype, str) else None
    if dtype is None or not isinstance(datatype, str):
        raise MessageError(f"input {name!r}: unsupported datatype {datatype!r}, expected one of {sorted(V2_TO_NUMPY)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(type(d) is int and d >= 0 for d in shape):
        raise MessageError(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} ints >= 0")
    expected = math.prod(shape)
    parameters = raw.get("parameters")
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    data = raw.get("data")
    if size is not None:
        if data is not None:
            raise MessageError(f"input {name!r}: give either 'data' or binary_data_size, not both")
        array = _binary_input(binary, offset, size, datatype, shape, expected, name)
        return name, array, offset + size
    if not isinstance(data, list):
        raise MessageError(f"input {name!r}: 'data' must be a list")
    array = _to_array(data, dtype, datatype, name)
    if array.size != expected:
        raise MessageError(f"input {name!r}: data has {array.size} values but shape {shape} needs {expected}")
    return name, array.reshape(shape), offset


def _binary_input(
    binary: memoryview | None, offset: int, size: object, datatype: str, shape: list[int], count: int, name: str
) -> np.ndarray:
    """View one input's bytes as an array, copying only if they are misaligned or big-endian."""
    if binary is None:
        raise MessageError(
            f"input {name!r}: binary_data_size needs the Inference-Header-Content-Length header"
        )
    if type(size) is not int or size < 0:
        raise MessageError(f"input {name!r}: binary_data_size must be an int >= 0")
    wire = _WIRE_DTYPES[datatype]
    if size != count * wire.itemsize:
        raise MessageError(
            f"input {name!r}: binary_data_size is {size} bytes but {datatype} shape {shape} needs "
            f"{count * wire.itemsize}"
        )
    if offset + size > len(binary):
        raise MessageError(f"input {name!r}: binary data runs past the end of the body")
    if count == 0:
        return np.empty(shape, dtype=V2_TO_NUMPY[datatype])
    array = np.frombuffer(binary, dtype=wire, count=count, offset=offset)
    if not _LITTLE_ENDIAN:
        array = array.astype(V2_TO_NUMPY[datatype])
    elif not array.flags.aligned:
        # The JSON header has any length, so the data can start at any byte.
        array = array.copy()
    if datatype == "BOOL" and array.view(np.uint8).max() > 1:
        raise MessageError(f"input {name!r}: BOOL bytes must be 0 or 1")
    return array.reshape(shape)


def _to_array(data: list[Any], dtype: np.dtype[Any], datatype: str, name: str) -> np.ndarray:
    """Convert JSON values to ``dtype``, refusing values that would change on the way.

    numpy alone would turn ``null`` into NaN, ``"1.5"`` into 1.5 and 1.7 into an INT32 1, so
    the values are first read as whatever they are, then checked against the target kind.
    """
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MessageError(f"input {name!r}: 'data' is not a regular (non-ragged) array of numbers") from exc
    if array.dtype == dtype:
        return array
    if array.size == 0:
        return array.astype(dtype)
    kind, target = array.dtype.kind, dtype.kind
    if target == "b":
        raise MessageError(f"input {name!r}: {datatype} data must be true/false")
    if target == "f":
        if kind not in "iuf":
            raise MessageError(f"input {name!r}: {datatype} data must be numbers")
        try:
            # FP32/FP16 overflow would otherwise become inf with only a RuntimeWarning.
            with np.errstate(over="raise"):
                return array.astype(dtype)
        except FloatingPointError as exc:
            raise MessageError(f"input {name!r}: a value is out of range for {datatype}") from exc
    # Integer target: only integers that fit (a too-large JSON integer arrives as kind "O").
    if kind not in "iu":
        raise MessageError(f"input {name!r}: {datatype} data must be integers")
    info = np.iinfo(dtype)
    if array.min() < info.min or array.max() > info.max:
        raise MessageError(f"input {name!r}: a value is out of range for {datatype}")
    return array.astype(dtype)


def _decode_outputs(raw: object, all_binary: bool) -> tuple[list[str] | None, frozenset[str]]:
    """The outputs asked for, in order, and which of them go back as binary data."""
    if raw is None:
        return None, frozenset()
    if not isinstance(raw, list):
        raise MessageError("infer request: 'outputs' must be a list")
    names: list[str] = []
    binary: set[str] = set()
    for position, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise MessageError(f"outputs[{position}]: must be an object with a string 'name'")
        as_binary = all_binary
        parameters = item.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise MessageError(f"output {name!r}: 'parameters' must be an object")
            if parameters.get("classification"):
                raise MessageError(f"output {name!r}: the classification extension is not supported")
            if "binary_data" in parameters:
                as_binary = _flag(parameters, "binary_data", f"output {name!r}")
        if as_binary:
            binary.add(name)
        names.append(name)
    return names, frozenset(binary)


def encode_infer_response(
    model: LoadedModel,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray],
    output_names: list[str] | None,
    binary_outputs: frozenset[str] = frozenset(),
    all_binary: bool = False,
) -> tuple[bytes, int | None]:
    """Encode model outputs as an infer response.

    Args:
        model: The model that answered.
        request_id: The request's id, echoed if not None.
        outputs: What :meth:`LoadedModel.predict` returned.
        output_names: The outputs asked for, in order; None for all, in the model's order.
        binary_outputs: Outputs to send as binary tensor data.
        all_binary: Send every output as binary tensor data.

    Returns:
        The response body, and the length of its JSON header if binary data follows it (the
        ``Inference-Header-Content-Length`` to send), else None.

    Raises:
        InferenceError: If an output asked for is not one the model has.
    """
    names = list(outputs) if output_names is None else output_names
    encoded: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in names:
        array = outputs.get(name)
        if array is None:
            raise InferenceError(f"model {model.name!r} has no output {name!r}; it has {list(outputs)}")
        # Not .get(dtype, str(dtype)): that would build the fallback name on every call.
        datatype = NUMPY_TO_V2.get(array.dtype) or str(array.dtype)
        if all_binary or name in binary_outputs:
            raw = _little_endian_bytes(array)
            chunks.append(raw)
            encoded.append(
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
        else:
            encoded.append(
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    # tolist() yields Python scalars, which json encodes without a custom hook.
                    "data": array.ravel().tolist(),
                }
            )
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = encoded
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _little_endian_bytes(array: np.ndarray) -> bytes:
    """Row-major little-endian bytes of ``array`` (BOOL as one 0/1 byte, as numpy stores it)."""
    byteorder = array.dtype.byteorder
    if byteorder == ">" or (byteorder == "=" and not _LITTLE_ENDIAN):
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    """The v2 model metadata object of ``model``."""
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": PLATFORMS.get(model.runtime, model.runtime),
        "inputs": [spec.to_dict() for spec in model.inputs],
        "outputs": [spec.to_dict() for spec in model.outputs],
    }


# --- HTTP. -------------------------------------------------------------------------------------


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")).encode(), status_code=status, media_type=_JSON)


def _error(message: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    response = _json({"error": message}, status)
    if headers:
        response.headers.update(headers)
    return response


async def _receive_body(receive: Receive, declared: bytes | None, max_bytes: int) -> bytes | None:
    """Read the request body from ASGI, refusing to buffer more than ``max_bytes`` of it.

    Returns:
        The body, or None if the client disconnected first.

    Raises:
        TooLargeError: If the body is, or is declared to be, over ``max_bytes``.
        MessageError: If Content-Length is not a number.
    """
    if declared is not None:
        try:
            length = int(declared)
        except ValueError as exc:
            raise MessageError(f"bad Content-Length {declared!r:.40}") from exc
        if length > max_bytes:
            raise TooLargeError(f"request body of {length} bytes is over the {max_bytes}-byte limit")
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        chunk = message.get("body", b"")
        total += len(chunk)
        # Also for chunked bodies, which declare no length: count while reading.
        if total > max_bytes:
            raise TooLargeError(f"request body is over the {max_bytes}-byte limit")
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def _send(send: Send, status: int, body: bytes, content_type: bytes, json_length: int | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if json_length is not None:
        headers.append((_BINARY_HEADER_B, b"%d" % json_length))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def infer_target(path: str) -> tuple[str, str | None] | None:
    """``(name, version)`` if ``path`` is a v2 infer path (version None if not in it), else None.

    Segments match as FastAPI's ``{name}`` would: one or more characters other than ``/``.
    """
    if not path.startswith(_INFER_PREFIX) or not path.endswith(_INFER_SUFFIX):
        return None
    parts = path[len(_INFER_PREFIX) : -len(_INFER_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


class _InferHandler:
    """Answers infer requests over raw ASGI; the fast path and the FastAPI routes both call it."""

    def __init__(self, registry: ModelRegistry, max_request_bytes: int, batchers: BatcherPool | None) -> None:
        self._registry = registry
        self._max_bytes = max_request_bytes
        self._batchers = batchers

    def find(self, name: str, version: str | None) -> LoadedModel:
        model = self._registry.get(name, version)
        if model is not None:
            return model
        if version is not None and self._registry.get(name) is not None:
            raise NotFoundError(f"model {name!r} has no version {version!r}")
        raise NotFoundError(f"model {name!r} not found")

    async def __call__(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None) -> None:
        content_length = header_length = None
        for key, value in scope["headers"]:  # ASGI servers lower-case header names
            if key == b"content-length":
                content_length = value
            elif key == _BINARY_HEADER_B:
                header_length = value
        try:
            body = await _receive_body(receive, content_length, self._max_bytes)
            if body is None:
                return
            model = self.find(name, version)
            request = decode_infer_request(body, self._max_bytes, parse_header_length(header_length))
            batcher = None if self._batchers is None else self._batchers.get(model)
            if batcher is None:
                # Called inline on the event loop, not via the threadpool: measured with httpx
                # against uvicorn on localhost (2-core x86, demo 32-64-64-4 MLP), inline answered
                # batch-1 requests ~0.2 ms faster (median 1.36 vs 1.60 ms ONNX, 1.18 vs 1.40 ms
                # TFLite) and served 4 concurrent clients faster too (~600 vs ~500 req/s), because
                # the thread hop costs more than these models' inference and the GIL serialises
                # JSON work anyway. The price: a long inference delays other requests, health
                # probes included, while it runs. Batching moves the run to a worker thread.
                outputs = model.predict(request.inputs)
            else:
                outputs = await batcher.predict_async(request.inputs)
            payload, json_length = encode_infer_response(
                model, request.id, outputs, request.output_names, request.binary_outputs, request.all_binary
            )
        except (MessageError, InferenceError, NotFoundError, TooLargeError) as exc:
            error = json.dumps({"error": exc.message}, separators=(",", ":")).encode()
            await _send(send, exc.http_status, error, _JSON_B)
            return
        if json_length is None:
            await _send(send, 200, payload, _JSON_B)
        else:
            await _send(send, 200, payload, _OCTETS_B, json_length)


class _InferFastPath:
    """ASGI middleware: ``POST /v2/models/{name}[/versions/{version}]/infer`` skips FastAPI's router.

    Errors it lets escape still reach the app's outermost error middleware (a 500 in the
    protocol's error shape, logged with its traceback).
    """

    def __init__(self, app: ASGIApp, handler: _InferHandler) -> None:
        self.app = app
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = infer_target(scope["path"])
            if target is not None:
                await self._handler(scope, receive, send, *target)
                return
        await self.app(scope, receive, send)


class _InferRoute:
    """The infer routes as FastAPI sees them: reached only by paths the fast path does not take
    (an app mounted under a root path); they also make FastAPI answer other methods with 405."""

    def __init__(self, handler: _InferHandler) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        await self._handler(scope, receive, send, params["name"], params.get("version"))


def create_inference_app(
    registry: ModelRegistry,
    *,
    server_name: str = "edgefleet-agent",
    server_version: str = "0.1.0",
    max_request_bytes: int = 64 * 1024 * 1024,
    batching: BatchingConfig | None = None,
) -> FastAPI:
    """Build the v2 inference API over ``registry``.

    Args:
        registry: The loaded models; looked up on every request, so models may come and go.
        server_name: Reported by ``GET /v2``.
        server_version: Reported by ``GET /v2``.
        max_request_bytes: Largest infer request body accepted (413 above it).
        batching: Dynamic batching settings; None or disabled runs every request inline.

    Returns:
        The ASGI application.
    """
    app = FastAPI(title=server_name, version=server_version, docs_url=None, redoc_url=None, openapi_url=None)
    batchers = BatcherPool(batching) if batching is not None and batching.enabled else None
    handler = _InferHandler(registry, max_request_bytes, batchers)
    app.add_middleware(_InferFastPath, handler=handler)
    infer_route = _InferRoute(handler)
    # An ASGI app as the endpoint: Starlette's Route serves it as such, though add_route's type
    # hint names only request handlers.
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        app.add_route(path, infer_route, methods=["POST"], include_in_schema=False)  # type: ignore[arg-type]

    def metadata(name: str, version: str | None) -> Response:
        try:
            return _json(model_metadata(handler.find(name, version)))
        except NotFoundError as exc:
            return _error(exc.message, 404)

    def ready(name: str, version: str | None) -> Response:
        try:
            model = handler.find(name, version)
        except NotFoundError as exc:
            return _error(exc.message, 404)
        return _json({"name": model.name, "ready": True})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def server_ready() -> Response:
        # Serving means ready: models are reported one by one by the model ready endpoint.
        return _json({"ready": True})

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json({"name": server_name, "version": server_version, "extensions": list(EXTENSIONS)})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def get_model(name: str, version: str | None = None) -> Response:
        return metadata(name, version)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def get_model_ready(name: str, version: str | None = None) -> Response:
        return ready(name, version)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown paths and wrong methods get the protocol's error shape, not FastAPI's.
        return _error(str(exc.detail), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> Response:
        # Reached only by bugs: client mistakes are answered above. Starlette still re-raises
        # the exception after sending this, so it is logged by the server with its traceback.
        return _error(f"internal error: {type(exc).__name__}", 500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        return _error(f"invalid request: {exc.errors()!r:.500}", 400)

    return app
