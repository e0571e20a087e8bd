"""The one exception tree of edgefleet.

Every error raised by edgefleet code derives from :class:`EdgefleetError`. Foreign exceptions
(paho, onnxruntime, httpx, sqlite, tarfile) are translated where they enter, with ``raise ... from``.

::

    EdgefleetError                      .code (stable string), .retryable (bool)
    ├── ConfigError                     bad configuration file or option
    ├── MessageError                    an MQTT/API payload that does not decode
    │   └── UnknownSchemaError          a well-formed message of a version we do not speak
    ├── TrustError                      something is not signed by whom it must be
    │   ├── SignatureError              bad/missing signature, unknown key, wrong payload type
    │   └── DirectiveError              desired state replayed, expired, or for another device
    ├── BundleError                     a bundle that must not be installed
    │   ├── BundleIntegrityError        hash/size/file-list mismatch with the signed manifest
    │   ├── UnsafeArchiveError          links, special files, path escapes, oversize content
    │   ├── IncompatibleBundleError     runtime/arch/accelerator the device cannot serve
    │   └── DowngradeError              older than the version floor a newer manifest set
    ├── TransferError (retryable)       a download that did not complete; try again
    ├── RuntimeLoadError                the model would not load in its runtime
    ├── InferenceError                  a request the model cannot answer (shape, dtype, name)
    ├── NotFoundError                   a model, version, device or bundle that does not exist
    └── BrokerError                     the embedded MQTT broker would not start, answer, or stop
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Root of all edgefleet errors.

    Attributes:
        code: A stable, machine-readable identifier reported in events and API bodies.
        retryable: Whether the same operation may succeed if tried again later.
    """

    code = "error"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, object]:
        """Return the error as a JSON-ready dict for events and API responses."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class ConfigError(EdgefleetError):
    code = "config_invalid"


class MessageError(EdgefleetError):
    code = "message_invalid"


class UnknownSchemaError(MessageError):
    code = "schema_unknown"


class TrustError(EdgefleetError):
    code = "untrusted"


class SignatureError(TrustError):
    code = "signature_invalid"


class DirectiveError(TrustError):
    code = "directive_rejected"


class BundleError(EdgefleetError):
    code = "bundle_invalid"


class BundleIntegrityError(BundleError):
    code = "bundle_integrity"


class UnsafeArchiveError(BundleError):
    code = "bundle_unsafe"


class IncompatibleBundleError(BundleError):
    code = "bundle_incompatible"


class TransferError(EdgefleetError):
    code = "transfer_failed"
    retryable = True


class RuntimeLoadError(EdgefleetError):
    code = "runtime_load_failed"


class InferenceError(EdgefleetError):
    code = "inference_invalid"


class NotFoundError(EdgefleetError):
    code = "not_found"


class BrokerError(EdgefleetError):
    """The embedded MQTT broker (mosquitto or amqtt) would not start, answer, or stop."""

    code = "broker_failed"


class DowngradeError(BundleError):
    """A bundle older than the floor a newer, installed manifest set (rollback attack or mistake)."""

    code = "downgrade_refused"
