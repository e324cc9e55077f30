"""fhirmatch: screen FHIR R4 hospital data against computable clinical-trial eligibility criteria.

This module only re-exports the public API; see the README for a tour.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    AuthenticationError,
    ConfigurationError,
    DataError,
    FatalNetworkError,
    FhirmatchError,
    NetworkError,
    StateError,
    TemporaryNetworkError,
    TerminologyError,
    TrialDefinitionError,
    UnitError,
)

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "DataError",
    "FatalNetworkError",
    "FhirmatchError",
    "NetworkError",
    "StateError",
    "TemporaryNetworkError",
    "TerminologyError",
    "TrialDefinitionError",
    "UnitError",
    "__version__",
]
