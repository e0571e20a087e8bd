"""The one exception tree of edgefleet.

Every error raised by edgefleet code derives from :class:`EdgefleetError`. Foreign exceptions
(paho, onnxruntime, LiteRT, httpx, sqlite, tarfile, json, cryptography, tuf) are translated where
they enter, with ``raise ... from exc``, so a caller needs to know only this tree.

Each class says three things about its errors, as class attributes:

- ``code``: a stable, machine-readable string, reported in events and API bodies.
- ``retryable``: whether the same operation, tried again later with nothing changed by anyone,
  may succeed. Only transfers are: a network that failed may come back; a bad signature, a
  malformed message or a missing model will be just as bad next time.
- ``http_status``: the status an HTTP API answers with. This is the one status map: the control
  plane's API and the agent's inference API both read it. 4xx is the caller's mistake; 500 is
  ours; 503 asks the caller to retry.

The tree (``tests/unit/test_errors.py`` keeps it equal to the classes edgefleet defines)::

    EdgefleetError                  500        the root: a bug or a failure of ours
    ├── ConfigError                 400        bad configuration file, option or argument
    ├── MessageError                400        an MQTT/API payload that does not decode
    │   ├── UnknownSchemaError      400        a well-formed message of a version we do not speak
    │   └── _DuplicateKeyError      400        a key twice in one JSON object (shared.wire.strict)
    ├── TooLargeError               413        an upload or request over a configured size limit
    ├── ConflictError               409        the target exists already, with other content
    ├── NotFoundError               404        a model, version, device or bundle that does not exist
    ├── TrustError                  400        something is not signed by whom it must be
    │   ├── SignatureError          400        bad/missing signature, unknown key, wrong payload type
    │   ├── DirectiveError          400        desired state replayed, expired, or for another device
    │   └── KeyringExpiredError     400        a keyring version past its expiry
    ├── BundleError                 400        a bundle that must not be installed
    │   ├── BundleIntegrityError    400        hash/size/file-list mismatch with the signed manifest
    │   ├── UnsafeArchiveError      400        links, special files, path escapes, oversize content
    │   ├── IncompatibleBundleError 400        runtime/arch/accelerator the device cannot serve
    │   └── DowngradeError          400        older than the version floor a newer manifest set
    ├── TransferError               503 retry  a download or request that did not complete
    │   └── _AttemptFailed          503 retry  one HTTP request to one source failed (agent.transfer.http)
    ├── RuntimeLoadError            400        the model would not load in its runtime
    ├── InferenceError              400        a request the model cannot answer (shape, dtype, name)
    │   └── OutputMismatchError     400        a shadow's output cannot be compared (agent.serving.shadow)
    ├── IllegalTransition           500        a state machine got an event its table has no row for
    ├── StepFailed                  500        a deployment step failed; carries its event (agent.deployment)
    ├── Cancelled                   500        a download given up for a newer desired state (agent.transfer)
    ├── ApiError                    500        the control plane answered an SDK call with an error (SDK client)
    ├── FleetError                  500        a local fleet process would not start (control_plane.devtools)
    └── BrokerError                 500        the embedded MQTT broker would not start, answer, or stop
"""

from __future__ import annotations

from typing import ClassVar


class EdgefleetError(Exception):
    """Root of all edgefleet errors.

    Attributes:
        message: What went wrong, for a person.
        code: A stable, machine-readable identifier reported in events and API bodies.
        retryable: Whether the same operation may succeed if tried again later.
        http_status: The HTTP status an API answers this error with.
    """

    code: ClassVar[str] = "error"
    retryable: ClassVar[bool] = False
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, object]:
        """Return the error as a JSON-ready dict for events and API responses."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class ConfigError(EdgefleetError):
    """A configuration file, option or argument that cannot be used as given."""

    code = "config_invalid"
    http_status = 400


class MessageError(EdgefleetError):
    """An MQTT or API payload that does not decode, or breaks its schema's rules."""

    code = "message_invalid"
    http_status = 400


class UnknownSchemaError(MessageError):
    """A well-formed message of a schema version this build does not speak."""

    code = "schema_unknown"


class TooLargeError(EdgefleetError):
    """An upload or request over a configured size limit."""

    code = "too_large"
    http_status = 413


class ConflictError(EdgefleetError):
    """The target exists already with other content (a name and version, a directory)."""

    code = "conflict"
    http_status = 409


class NotFoundError(EdgefleetError):
    """A model, version, device or bundle that does not exist."""

    code = "not_found"
    http_status = 404


class TrustError(EdgefleetError):
    """Something is not signed by whom it must be, or its signed terms do not hold."""

    code = "untrusted"
    http_status = 400


class SignatureError(TrustError):
    """A bad or missing signature, an unknown key, or the wrong payload type."""

    code = "signature_invalid"


class DirectiveError(TrustError):
    """A desired state that is replayed, expired, or addressed to another device."""

    code = "directive_rejected"


class KeyringExpiredError(TrustError):
    """A keyring version past its expiry: its keys may no longer be trusted."""

    code = "keyring_expired"


class BundleError(EdgefleetError):
    """A bundle that must not be installed."""

    code = "bundle_invalid"
    http_status = 400


class BundleIntegrityError(BundleError):
    """A bundle whose files do not match its signed manifest (hash, size, file list)."""

    code = "bundle_integrity"


class UnsafeArchiveError(BundleError):
    """A bundle archive with links, special files, path escapes or oversize content."""

    code = "bundle_unsafe"


class IncompatibleBundleError(BundleError):
    """A bundle for a runtime, architecture or accelerator this device cannot serve."""

    code = "bundle_incompatible"


class DowngradeError(BundleError):
    """A bundle older than the floor a newer, installed manifest set (rollback attack or mistake)."""

    code = "downgrade_refused"


class TransferError(EdgefleetError):
    """A download or request that did not complete; the same one may succeed later."""

    code = "transfer_failed"
    retryable = True
    http_status = 503


class RuntimeLoadError(EdgefleetError):
    """A model file that would not load in its runtime (or a runtime that is not installed)."""

    code = "runtime_load_failed"
    http_status = 400


class InferenceError(EdgefleetError):
    """An inference request the model cannot answer (input name, shape, dtype), or a runtime failure."""

    code = "inference_invalid"
    http_status = 400


class BrokerError(EdgefleetError):
    """The embedded MQTT broker (mosquitto or amqtt) would not start, answer, or stop.

    Not retryable: a port in use, a missing binary or a broker that survived SIGKILL needs an
    operator, not another try.
    """

    code = "broker_failed"
