"""A forged chunk (self-consistent, since the sender computes its hash) must not lose the rollout.

The bytes that do not hash to the signed digest are a failed transfer: retryable, the progress
deleted, and the next attempt, with a genuine sender, completes. Before, the same forgery was a
``bundle_integrity`` refusal, which ends the deployment as ``rejected`` until a new desired state.
"""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import pytest

from edgefleet.agent.config import TransferConfig
from edgefleet.agent.deployment.failures import classify
from edgefleet.agent.deployment.machine import Event, State
from edgefleet.agent.transfer.mqtt_chunks import ChunkFetcher
from edgefleet.shared.errors import TransferError
from edgefleet.shared.wire.chunks import Chunk, ChunkRequest

CHUNK = 1024
BLOB = random.Random(8).randbytes(CHUNK * 6 + 100)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
CONFIG = TransferConfig(chunk_size_bytes=CHUNK, window_chunks=128, chunk_timeout_s=0.2)


def _chunk(index: int, forged: bool) -> bytes:
    data = BLOB[index * CHUNK : (index + 1) * CHUNK]
    if forged:
        data = bytes(len(data))  # other bytes, with a hash that matches them
    return Chunk(bundle_digest=DIGEST, chunk_size=CHUNK, index=index, total_size=len(BLOB), data=data).encode()


def _fetcher(downloads: Path, forge: set[int]) -> ChunkFetcher:
    holder: list[ChunkFetcher] = []

    def answer(request: ChunkRequest) -> None:
        for index in request.indices:
            holder[0].on_message(_chunk(index, index in forge))

    holder.append(ChunkFetcher(downloads, CONFIG, answer))
    return holder[0]


def test_a_forged_chunk_is_a_retryable_transfer_failure_and_the_retry_starts_clean(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    with pytest.raises(TransferError, match="corrupted or forged in transit") as info:
        _fetcher(downloads, forge={3}).fetch(DIGEST, len(BLOB), threading.Event())
    assert list(downloads.iterdir()) == []  # the forged bytes are gone, not resumed from
    failure = classify(info.value, State.DOWNLOADING)
    assert (failure.event, failure.retryable) == (Event.FAIL, True)  # tried again, not an outcome

    path = _fetcher(downloads, forge=set()).fetch(DIGEST, len(BLOB), threading.Event())
    assert path.read_bytes() == BLOB
