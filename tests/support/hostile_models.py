"""Model files built to hurt a runtime, for the tests that prove the server never runs them."""

from __future__ import annotations

import flatbuffers


def empty_tflite() -> bytes:
    """A valid TFLite flatbuffer (version 3, ``TFL3``) with no subgraph: 24 bytes, SIGSEGV in LiteRT."""
    builder = flatbuffers.Builder(0)
    builder.StartObject(8)  # Model has 8 fields; only version (field 0) is set
    builder.PrependUint32Slot(0, 3, 0)
    builder.Finish(builder.EndObject(), file_identifier=b"TFL3")
    return bytes(builder.Output())
