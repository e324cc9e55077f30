"""FHIR Bulk Data export (``$export``): kick-off, polling, streamed download, cleanup.

:func:`export_patient_data` asks the server for the data the trials' criteria need, as NDJSON
files on local disk, for :func:`fhirmatch.records.iter_patient_records` (which groups them by
patient in bounded memory, :mod:`fhirmatch.stream`). The steps, following the Bulk Data Access
IG (v2):

1. **Kick-off**: ``GET [base]/Group/[id]/$export`` (a group), ``[base]/Patient/$export`` (every
   patient) or ``[base]/$export`` (system level), with ``Prefer: respond-async`` and ``Accept:
   application/fhir+json``. ``_type`` lists Patient and the resource types the criteria use
   (plus Medication when medication requests are read, for ``medicationReference``);
   ``_typeFilter`` (opt-in, ``type_filter=True``) narrows Observation, Condition … to the
   criteria's codes (one query per type, codes OR-ed with commas). A server that rejects
   ``_typeFilter`` (4xx) is asked again without it.
   ``_since`` exports only resources changed since then (incremental runs).
2. **Polling** the ``Content-Location`` status URL: ``202`` while running (``X-Progress`` is
   logged, ``Retry-After`` honoured — seconds or an HTTP date — else the wait doubles from 1 s up
   to 60 s), ``200`` with the manifest when complete, an error status when the job failed.
3. **Download** of every ``output`` file, streamed to disk in 1 MiB pieces (never held in
   memory) and retried on connection errors, 429 and 5xx. The access token is sent only when the
   manifest says ``requiresAccessToken`` and the file is on the FHIR server's own origin.
   ``error`` files (OperationOutcomes) are downloaded too and their issue counts logged.
4. **Cleanup**: ``DELETE`` on the status URL tells the server it may remove the files; the job is
   also cancelled this way when anything fails or the run is interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from .client import FhirClient
from .errors import FatalNetworkError, NetworkError, TemporaryNetworkError
from .http import parse_retry_after, redact_url, same_origin, url_path
from .model import DataInput
from .records import reference_id

__all__ = [
    "BulkExporter",
    "ExportManifest",
    "ExportRequest",
    "export_patient_data",
    "export_request_for",
]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
NDJSON = "application/fhir+ndjson"
#: types whose ``code`` element is searchable with the ``code`` parameter
CODE_FILTER_TYPES = frozenset(
    {"Observation", "Condition", "Procedure", "DiagnosticReport", "AllergyIntolerance"}
)
MEDICATION_TYPES = frozenset(
    {"MedicationRequest", "MedicationStatement", "MedicationAdministration", "MedicationDispense"}
)
CHUNK = 1024 * 1024
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class ExportRequest:
    """What to ask ``$export`` for: resource types, per-type filters, and a ``_since`` instant."""

    types: tuple[str, ...]
    type_filters: tuple[str, ...] = ()
    since: str | None = None
    group: str | None = None
    #: ``system`` exports everything on the server (``[base]/$export``); ``patient`` all patients
    level: str = "patient"

    @property
    def path(self) -> str:
        if self.group:
            return f"Group/{self.group}/$export"
        return "$export" if self.level == "system" else "Patient/$export"

    def params(self, *, with_filters: bool = True) -> list[tuple[str, str]]:
        out = [("_type", ",".join(self.types))]
        if self.since:
            out.append(("_since", self.since))
        if with_filters:
            out.extend(("_typeFilter", f) for f in self.type_filters)
        return out


def _token(system: str, code: str) -> str:
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")

    return f"{esc(system)}|{esc(code)}" if system else esc(code)


def export_request_for(
    requirements: Iterable[DataInput],
    *,
    since: str | None = None,
    group: str | None = None,
    level: str = "patient",
) -> ExportRequest:
    """The export the criteria's data requirements need (types and ``code`` filters)."""
    types = {"Patient"}
    codes: dict[str, set[tuple[str, str]] | None] = {}
    for req in requirements:
        if req.resource_type == "Patient":
            continue
        types.add(req.resource_type)
        if req.resource_type in MEDICATION_TYPES or req.code_path == "medication":
            types.add("Medication")
        filterable = (
            req.resource_type in CODE_FILTER_TYPES
            and req.code_path == "code"
            and req.codes
            and not req.text_systems  # a diagnosis recorded as text has no code to filter by
        )
        if not filterable:
            codes[req.resource_type] = None
        elif req.resource_type not in codes:
            codes[req.resource_type] = set(req.codes)
        elif (known := codes[req.resource_type]) is not None:
            known |= req.codes
    filters = tuple(
        f"{rtype}?code={','.join(_token(s, c) for s, c in sorted(wanted))}"
        for rtype, wanted in sorted(codes.items())
        if wanted
    )
    return ExportRequest(tuple(sorted(types)), filters, since, group, level)


@dataclass
class ExportManifest:
    """A completed export: the manifest and where its files were saved."""

    transaction_time: str | None
    requires_access_token: bool
    #: (resource type, local path) of each output file
    files: list[tuple[str, Path]] = field(default_factory=list)
    #: local paths of the error files (OperationOutcome NDJSON)
    error_files: list[Path] = field(default_factory=list)
    #: whether the server accepted ``_typeFilter`` (False: everything of the types was asked for)
    filtered: bool = False

    @property
    def paths(self) -> list[Path]:
        return [p for _t, p in self.files]


class BulkExporter:
    """Runs one ``$export`` job against ``client``'s server and saves its files in ``workdir``.

    ``sleep`` and ``clock`` are injectable for tests; ``timeout`` bounds the whole wait for
    the job (seconds); ``max_wait`` caps one polling interval.
    """

    def __init__(
        self,
        client: FhirClient,
        workdir: str | Path,
        *,
        timeout: float = 6 * 3600,
        max_wait: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.max_wait = max_wait
        self.sleep = sleep
        self.clock = clock

    # -- the whole job

    def run(self, request: ExportRequest) -> ExportManifest:
        """Kick off, wait, download and clean up; returns the manifest with local paths."""
        status_url, filtered = self.kickoff(request)
        try:
            manifest = self.poll(status_url)
            result = self.download(manifest)
            result.filtered = filtered
        except BaseException:
            self.delete(status_url)
            raise
        self.delete(status_url)
        return result

    # -- steps

    def kickoff(self, request: ExportRequest) -> tuple[str, bool]:
        """Start the job; returns the status URL and whether ``_typeFilter`` was sent."""
        headers = {"Prefer": "respond-async", "Accept": FHIR_JSON}
        transport = self.client.transport
        filtered = bool(request.type_filters)
        try:
            response = transport.request(
                "GET", request.path, params=request.params(), headers=headers
            )
        except FatalNetworkError as exc:
            if not filtered or exc.status not in (400, 422):
                raise
            log.info("the server refused _typeFilter (HTTP %s); exporting whole types", exc.status)
            filtered = False
            response = transport.request(
                "GET", request.path, params=request.params(with_filters=False), headers=headers
            )
        location = response.headers.get("Content-Location")
        if response.status_code != 202 or not location:
            raise FatalNetworkError(
                f"$export kick-off answered HTTP {response.status_code} without a status URL",
                method="GET",
                url=redact_url(transport.url_for(request.path)),
                status=response.status_code,
            )
        log.info("bulk export started: %s", url_path(location))
        return location, filtered

    def poll(self, status_url: str) -> dict[str, Any]:
        """Wait for the job to complete; returns the manifest."""
        deadline = self.clock() + self.timeout
        wait = 1.0
        while True:
            response = self.client.transport.request(
                "GET", status_url, headers={"Accept": "application/json"}
            )
            if response.status_code == 200:
                manifest = response.json()
                if not isinstance(manifest, dict) or not isinstance(manifest.get("output"), list):
                    raise FatalNetworkError(
                        "$export status: the manifest has no output list",
                        method="GET",
                        url=redact_url(status_url),
                        status=200,
                    )
                return manifest
            progress = response.headers.get("X-Progress")
            asked = parse_retry_after(response.headers.get("Retry-After"))
            delay = min(asked if asked is not None else wait, self.max_wait)
            wait = min(wait * 2, self.max_wait)
            if self.clock() + delay > deadline:
                raise TemporaryNetworkError(
                    f"$export did not complete within {self.timeout:.0f} s",
                    method="GET",
                    url=redact_url(status_url),
                )
            log.info("bulk export in progress (%s); next check in %.0f s", progress or "?", delay)
            self.sleep(delay)

    def download(self, manifest: dict[str, Any]) -> ExportManifest:
        """Download every output and error file of ``manifest`` into ``workdir``."""
        token = bool(manifest.get("requiresAccessToken"))
        result = ExportManifest(manifest.get("transactionTime"), token)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for n, item in enumerate(manifest.get("output") or []):
            rtype = str(item.get("type") or "Resource")
            path = self.workdir / f"{n:04d}-{_SAFE_NAME.sub('_', rtype)}.ndjson"
            self._fetch(str(item["url"]), path, token)
            result.files.append((rtype, path))
        for n, item in enumerate(manifest.get("error") or []):
            path = self.workdir / f"error-{n:04d}.ndjson.txt"  # not read as patient data
            self._fetch(str(item["url"]), path, token)
            result.error_files.append(path)
            log.warning("bulk export reported %d issue line(s)", _count_lines(path))
        return result

    def delete(self, status_url: str) -> None:
        """Tell the server the job's files are no longer needed (best effort)."""
        try:
            self.client.transport.request("DELETE", status_url, ok_statuses=frozenset({404, 410}))
        except NetworkError as exc:
            log.warning("could not delete the bulk export job: %s", exc)

    # -- internals

    def _fetch(self, url: str, path: Path, token: bool) -> None:
        transport = self.client.transport
        url = transport.url_for(url)
        headers = {"Accept": NDJSON}
        authenticated = token and same_origin(url, transport.base_url)
        delays = transport.retry.delays(transport.rng)
        part = path.with_name(path.name + ".part")
        attempt = 0
        while True:
            attempt += 1
            send = dict(headers)
            if authenticated and transport.auth is not None:
                value = transport.auth.authorization(transport)
                if value:
                    send["Authorization"] = value
            transport.stats.add_request()
            why: str
            try:
                with transport.session.get(
                    url, headers=send, stream=True, timeout=transport.timeouts.as_tuple()
                ) as response:
                    status = response.status_code
                    if status < 400:
                        with part.open("wb") as fh:
                            for piece in response.iter_content(CHUNK):
                                fh.write(piece)
                        part.replace(path)
                        return
                    why = f"HTTP {status}"
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
            except (requests.ConnectionError, requests.Timeout) as exc:
                status, why, retry_after = 0, type(exc).__name__, None
            if (status in (0, 429) or status >= 500) and attempt <= len(delays):
                wait = retry_after if retry_after is not None else delays[attempt - 1]
                wait = min(wait, transport.retry.retry_after_cap)
                log.info("download %s: %s; retry in %.1f s", url_path(url), why, wait)
                transport.stats.add_retry()
                self.sleep(wait)
                continue
            part.unlink(missing_ok=True)
            cls = (
                TemporaryNetworkError if status in (0, 429) or status >= 500 else FatalNetworkError
            )
            raise cls(
                f"bulk file download failed: {why}",
                method="GET",
                url=redact_url(url),
                status=status or None,
            )


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _export_with_medications(exporter: BulkExporter, request: ExportRequest) -> ExportManifest:
    """Run ``request``; when a patient-level export with Medication is refused, export without
    it and read the Medications the exported medication resources refer to with searches.

    Medication is not in the Patient compartment, and HAPI FHIR refuses it in ``Patient/$export``
    and ``Group/[id]/$export`` (400, HAPI-0512); the Bulk Data IG leaves such types to the server.
    """
    try:
        return exporter.run(request)
    except FatalNetworkError as exc:
        if exc.status not in (400, 422) or "Medication" not in request.types:
            raise
        if request.level == "system" and not request.group:
            raise
        log.info(
            "the server refused Medication in a patient-level export (HTTP %s); exporting "
            "without it and reading the referenced Medications by search",
            exc.status,
        )
    without = dataclasses.replace(
        request, types=tuple(t for t in request.types if t != "Medication")
    )
    manifest = exporter.run(without)
    path = fetch_referenced_medications(exporter.client, manifest.paths, exporter.workdir)
    if path is not None:
        manifest.files.append(("Medication", path))
    return manifest


def fetch_referenced_medications(
    client: FhirClient, paths: Iterable[Path], workdir: Path, *, batch: int = 50
) -> Path | None:
    """Read the Medications that resources in the NDJSON ``paths`` refer to (``medication``
    ``Reference`` of MedicationRequest, MedicationAdministration …) with ``Medication?_id=``
    searches, and write them to one NDJSON file in ``workdir``; None when none is referenced."""
    wanted: set[str] = set()
    for path in paths:
        with path.open("rb") as fh:
            for line in fh:
                if b'"medicationReference"' not in line:
                    continue
                try:
                    res = json.loads(line)
                except ValueError:
                    continue  # the loader reports unreadable lines
                ref = (res.get("medicationReference") or {}) if isinstance(res, dict) else {}
                mid = reference_id(str(ref.get("reference", "")), "Medication")
                if mid:
                    wanted.add(mid)
    if not wanted:
        return None
    out = workdir / "zz-referenced-Medication.ndjson"
    found = 0
    ids = sorted(wanted)
    with out.open("w", encoding="utf-8") as fh:
        for start in range(0, len(ids), batch):
            chunk = ",".join(ids[start : start + batch])
            for res in client.iter_resources("Medication", {"_id": chunk}):
                fh.write(json.dumps(res, separators=(",", ":")) + "\n")
                found += 1
    log.info("read %d of %d referenced Medications by search", found, len(ids))
    return out


def export_patient_data(
    client: FhirClient,
    requirements: Iterable[DataInput],
    *,
    group: str | None = None,
    since: str | None = None,
    workdir: str | Path | None = None,
    type_filter: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    poll_max: float = 60.0,
) -> list[Path]:
    """Export the data ``requirements`` need and return the downloaded NDJSON paths.

    ``group`` exports that Group's members (``Group/[id]/$export``), else every patient.
    ``workdir`` receives the files (default: a new temporary directory, which the caller
    removes). ``type_filter=True`` also sends ``_typeFilter`` code filters: off by default,
    because servers differ in how they combine them (the IG OR-s repeated filters and reads
    ``code=a,b`` as a or b; the sekmet sandbox splits filter values on commas and AND-s them,
    which exports nothing), and a wrong filter silently loses data while no filter only costs
    download volume. ``poll_max`` caps one wait between status checks (seconds).
    """
    request = export_request_for(requirements, since=since, group=group)
    if not type_filter:
        request = ExportRequest(request.types, (), since, group, request.level)
    target = (
        Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fhirmatch-bulk-"))
    )
    try:
        exporter = BulkExporter(client, target, sleep=sleep, max_wait=poll_max)
        manifest = _export_with_medications(exporter, request)
    except BaseException:
        if workdir is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    log.info(
        "bulk export done: %d files (%s)",
        len(manifest.files),
        "filtered by code" if manifest.filtered else "whole types",
    )
    return manifest.paths
