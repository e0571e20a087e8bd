"""Whose fault a failed message is: the server's (try again) or the message's (drop it).

The bridge retries a handler that failed for a reason outside the message: the database is busy
or down, the disk failed. Those are the classes :func:`is_server_fault` names. Anything else a
handler raises was caused by what the message holds (a number no column can store, a value a
decoder did not foresee): trying again gives the same answer after sleeping, and every message
queued behind it waits. Such a *poison* message is dropped and counted, never retried.
"""

from __future__ import annotations

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

SERVER_FAULTS: tuple[type[BaseException], ...] = (
    OSError,  # disk, sockets (TimeoutError and ConnectionError are OSErrors)
    OperationalError,  # database locked, gone, out of space
    InterfaceError,  # the database connection broke
    DisconnectionError,
    PoolTimeoutError,  # no free connection in the pool
    MemoryError,
)
"""Failures that say nothing about the message: the same message may well succeed later."""


def is_server_fault(error: BaseException) -> bool:
    """Whether ``error``, raised while handling a message, is worth another try of the same message."""
    return isinstance(error, SERVER_FAULTS)
