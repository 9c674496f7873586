"""Errors raised by the package: the binary's (or server's) error code and message, as a Python
exception. ``InvalidInputError`` is also a ``ValueError`` and ``NotFoundError`` a ``LookupError``,
so code written against the reference keeps catching what it caught."""

from __future__ import annotations


class EksUpgradeAgentError(Exception):
    """An operation failed; ``code`` is the stable error code (``not_found``, ...)."""

    code = "failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFoundError(EksUpgradeAgentError, LookupError):
    code = "not_found"


class AlreadyExistsError(EksUpgradeAgentError):
    code = "already_exists"


class InvalidTransitionError(EksUpgradeAgentError):
    code = "invalid_transition"


class InvalidInputError(EksUpgradeAgentError, ValueError):
    code = "invalid_input"


class CorruptError(EksUpgradeAgentError):
    code = "corrupt"


class BackendError(EksUpgradeAgentError):
    code = "backend"


class CallTimeoutError(BackendError, TimeoutError):
    """The binary did not answer a call in time (``timeout=``, ``EUA_CALL_TIMEOUT``)."""

    code = "timeout"


class ClosedError(EksUpgradeAgentError):
    """The tracker or manager was cleaned up; create a new one."""

    code = "closed"


class BinaryNotFoundError(EksUpgradeAgentError, FileNotFoundError):
    code = "binary_not_found"


_BY_CODE = {
    c.code: c
    for c in (
        NotFoundError,
        AlreadyExistsError,
        InvalidTransitionError,
        InvalidInputError,
        CorruptError,
        BackendError,
        CallTimeoutError,
        ClosedError,
    )
}
# The server's codes for a request it could not read: bad input too, whichever backend.
for _code in ("malformed_json", "too_large", "invalid_query", "bad_request", "unsupported_media_type"):
    _BY_CODE[_code] = InvalidInputError


def error_from(code: str, message: str) -> EksUpgradeAgentError:
    """The exception for an error ``code`` (unknown codes give the base class)."""
    cls = _BY_CODE.get(code, EksUpgradeAgentError)
    return cls(message, code)
