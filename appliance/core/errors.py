"""The appliance's error hierarchy.

    ApplianceError
     ├── ConfigError          bad settings or a missing optional dependency
     ├── IngestError          a document could not be ingested
     │    └── ParseError      the parser rejected or could not read a file (reason kept)
     ├── StoreError           the vector store failed or is unusable
     │    └── StoreLockedError  another process owns the data folder
     ├── ServiceError         the core service's local API failed or answered an error
 ├── Busy                 too many questions wait for the chat model: try later (HTTP 503)
     ├── AuthError            not signed in, wrong password, expired session (HTTP 401)
     ├── AccessDenied         signed in but not allowed, e.g. staff on an admin action (403)
     ├── ModelError           a model could not be loaded or run
     └── ExportError          a model could not be merged, converted or exported

Messages name the bad value and the fix. They become exit codes only at the CLI edge.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """Settings are invalid, or an optional dependency is missing."""


class IngestError(ApplianceError):
    """A document could not be ingested."""


class ParseError(IngestError):
    """A parser rejected a file; ``reason`` is short and shown to admins."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreError(ApplianceError):
    """The vector store failed."""


class StoreLockedError(StoreError):
    """Another process owns the data folder."""


class ServiceError(ApplianceError):
    """The core service's local API failed or answered with an error (``status``: its HTTP
    status, 0 when it did not answer)."""

    def __init__(
        self, message: str, status: int = 0, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        """The service's ``Retry-After`` (a 503 when busy, a 401 when sign-ins are throttled)."""


class Busy(ApplianceError):
    """The queue in front of the chat model is longer than its limit (HTTP 503 with
    ``Retry-After``): the question was not taken, and asking again in ``retry_after_s``
    seconds likely finds room."""

    http_status = 503

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AuthError(ApplianceError):
    """Not signed in, a wrong password, or an expired session."""

    http_status = 401


class AccessDenied(ApplianceError):
    """Signed in, but not allowed to do this (a staff user on an admin action)."""

    http_status = 403


class ModelError(ApplianceError):
    """A model could not be loaded or run."""


class ExportError(ApplianceError):
    """A model could not be merged, converted or exported."""


def missing_dependency(
    module: str, extra: str | None = None, package: str | None = None
) -> ConfigError:
    """The error for a missing lazily imported library, with the command that mends it."""
    fix = (
        f"pip install 'domain-appliance[{extra}]'" if extra else f"pip install {package or module}"
    )
    return ConfigError(
        f"the Python package {module!r} is not installed; run: {fix} (or ./install.sh)"
    )
