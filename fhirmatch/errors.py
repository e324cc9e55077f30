"""The fhirmatch exception tree.

Every error fhirmatch raises on purpose derives from :class:`FhirmatchError`, so an integration
engine can catch one class. Structured fields travel with each error; the message is built from
them and never contains patient data, tokens or passwords.

::

    FhirmatchError
    ├── ConfigurationError            bad options, config or trial definitions (nothing written)
    │   ├── TrialDefinitionError      a trial definition that cannot be loaded or compiled
    │   └── DataFileError             a mapping table or bundled data file is missing or unreadable
    ├── TerminologyError              unknown ValueSet / code system
    ├── UnitError (+ ValueError)      a unit that cannot be parsed or converted
    ├── DataError (+ ValueError)      a patient resource or file that cannot be read
    ├── NetworkError                  talking to a FHIR server failed
    │   ├── TemporaryNetworkError     retryable (408, 429, 5xx, connection), retries exhausted
    │   └── FatalNetworkError         not retryable (4xx other than 408/429, TLS, refused redirect)
    │       ├── AuthenticationError   401/403, or the token endpoint refused us
    │       ├── ResourceNotFound      404: no such resource (or endpoint)
    │       ├── ResourceGone          410: the resource was deleted
    │       └── PreconditionFailed    412: If-Match version conflict / ambiguous conditional write
    └── StateError                    the job's state file is locked or inconsistent
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "DataError",
    "DataFileError",
    "FatalNetworkError",
    "FhirmatchError",
    "NetworkError",
    "PreconditionFailed",
    "ResourceGone",
    "ResourceNotFound",
    "StateError",
    "TemporaryNetworkError",
    "TerminologyError",
    "TrialDefinitionError",
    "UnitError",
]


class FhirmatchError(Exception):
    """Root of every error fhirmatch raises on purpose."""


class ConfigurationError(FhirmatchError):
    """Bad command-line options, configuration file, or trial definitions."""


class TrialDefinitionError(ConfigurationError):
    """A trial definition that cannot be loaded or compiled.

    ``source`` names the file (or server URL) and ``problems`` lists every problem found.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(source, self.problems)

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.source}: invalid trial definition:\n{lines}"


class DataFileError(ConfigurationError):
    """A mapping table, the bundled seed trials or demo patients, or a folder named by
    ``$FHIRMATCH_MAPPINGS``, that is missing or cannot be read. The message names the file."""


class TerminologyError(FhirmatchError):
    """A ValueSet or code system that cannot be resolved."""


class UnitError(FhirmatchError, ValueError):
    """A unit that cannot be parsed, or two units that cannot (or must not) be converted."""

    def __init__(self, unit: str, reason: str) -> None:
        self.unit = unit
        self.reason = reason
        super().__init__(unit, reason)

    def __str__(self) -> str:
        return f"unit {self.unit!r}: {self.reason}"


class DataError(FhirmatchError, ValueError):
    """A patient resource or file that cannot be read.

    ``where`` names the file or resource, never its values.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(where, reason)

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


class NetworkError(FhirmatchError):
    """Talking to a FHIR server failed.

    ``method`` and ``url`` describe the request (the URL without credentials or query secrets),
    ``status`` the HTTP status when there was a response, and ``outcome`` the server's
    OperationOutcome diagnostics text, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str | None = None,
        url: str | None = None,
        status: int | None = None,
        outcome: str | None = None,
    ) -> None:
        self.message = message
        self.method = method
        self.url = url
        self.status = status
        self.outcome = outcome
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.method and self.url:
            parts.append(f"({self.method} {self.url}")
            parts[-1] += f" -> {self.status})" if self.status is not None else ")"
        if self.outcome:
            parts.append(f": {self.outcome}")
        return " ".join(parts)


class TemporaryNetworkError(NetworkError):
    """A retryable failure (408, 429, 500, 502, 503, 504, connection error) that outlived
    its retries."""


class FatalNetworkError(NetworkError):
    """A failure that retrying will not fix (most 4xx, TLS errors, a refused cross-host link)."""


class AuthenticationError(FatalNetworkError):
    """The server or its token endpoint refused our credentials (401/403)."""


class StateError(FhirmatchError):
    """The job state file is locked by another run, or does not match this run's parameters."""


class ResourceNotFound(FatalNetworkError):
    """The server answered 404: the resource (or the endpoint) does not exist."""


class ResourceGone(FatalNetworkError):
    """The server answered 410: the resource existed and was deleted."""


class PreconditionFailed(FatalNetworkError):
    """The server answered 412: an If-Match version conflict or an ambiguous conditional write."""
