"""fhirmatch: screen FHIR R4 hospital data against computable clinical-trial eligibility criteria.

This module only re-exports the public API (``docs/api.md`` documents every name in
``__all__``). Names are imported on first use, so ``import fhirmatch`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .errors import (
    AuthenticationError,
    ConfigurationError,
    DataError,
    DataFileError,
    FatalNetworkError,
    FhirmatchError,
    NetworkError,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
    StateError,
    TemporaryNetworkError,
    TerminologyError,
    TrialDefinitionError,
    UnitError,
)

if TYPE_CHECKING:
    from .api import connect
    from .auth import Auth, BasicAuth, BearerAuth, NoAuth, SmartBackendAuth, build_auth
    from .client import ClientConfig, FhirClient
    from .data import default_trial_paths, demo_patients_dir, mappings_dir, seed_trials_dir
    from .engine import Engine
    from .executors import Executor, make_executor
    from .fetch import FetchResult, fetch_patient_data
    from .listen import Listener, ListenOptions, watches_for
    from .match import (
        MatchOptions,
        MatchOutcome,
        existing_subjects,
        load_trials_from_server,
        publish_trials,
        run_match,
        screen_patients,
    )
    from .model import Trial
    from .records import PatientRecord, iter_patient_records, load_patient_records
    from .report import render_report, write_report
    from .results import CriterionResult, TrialResult
    from .terminology import Terminology
    from .trials import check_trials, load_trials
    from .writeback import PlannedWrite, plan_subject, transaction_for

#: public name -> the module that defines it (imported lazily by ``__getattr__``)
_LAZY: dict[str, str] = {
    "connect": "api",
    "Auth": "auth",
    "BasicAuth": "auth",
    "BearerAuth": "auth",
    "NoAuth": "auth",
    "SmartBackendAuth": "auth",
    "build_auth": "auth",
    "ClientConfig": "client",
    "FhirClient": "client",
    "default_trial_paths": "data",
    "demo_patients_dir": "data",
    "mappings_dir": "data",
    "seed_trials_dir": "data",
    "Engine": "engine",
    "Executor": "executors",
    "make_executor": "executors",
    "FetchResult": "fetch",
    "fetch_patient_data": "fetch",
    "ListenOptions": "listen",
    "Listener": "listen",
    "watches_for": "listen",
    "MatchOptions": "match",
    "MatchOutcome": "match",
    "existing_subjects": "match",
    "load_trials_from_server": "match",
    "publish_trials": "match",
    "run_match": "match",
    "screen_patients": "match",
    "Trial": "model",
    "PatientRecord": "records",
    "iter_patient_records": "records",
    "load_patient_records": "records",
    "render_report": "report",
    "write_report": "report",
    "CriterionResult": "results",
    "TrialResult": "results",
    "Terminology": "terminology",
    "check_trials": "trials",
    "load_trials": "trials",
    "PlannedWrite": "writeback",
    "plan_subject": "writeback",
    "transaction_for": "writeback",
}

__all__ = [
    "Auth",
    "AuthenticationError",
    "BasicAuth",
    "BearerAuth",
    "ClientConfig",
    "ConfigurationError",
    "CriterionResult",
    "DataError",
    "DataFileError",
    "Engine",
    "Executor",
    "FatalNetworkError",
    "FetchResult",
    "FhirClient",
    "FhirmatchError",
    "ListenOptions",
    "Listener",
    "MatchOptions",
    "MatchOutcome",
    "NetworkError",
    "NoAuth",
    "PatientRecord",
    "PlannedWrite",
    "PreconditionFailed",
    "ResourceGone",
    "ResourceNotFound",
    "SmartBackendAuth",
    "StateError",
    "TemporaryNetworkError",
    "Terminology",
    "TerminologyError",
    "Trial",
    "TrialDefinitionError",
    "TrialResult",
    "UnitError",
    "__version__",
    "build_auth",
    "check_trials",
    "connect",
    "default_trial_paths",
    "demo_patients_dir",
    "existing_subjects",
    "fetch_patient_data",
    "iter_patient_records",
    "load_patient_records",
    "load_trials",
    "load_trials_from_server",
    "make_executor",
    "mappings_dir",
    "plan_subject",
    "publish_trials",
    "render_report",
    "run_match",
    "screen_patients",
    "seed_trials_dir",
    "transaction_for",
    "watches_for",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fhirmatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
