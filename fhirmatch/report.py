"""The HTML report of a match run: one self-contained file (inline CSS, no script, no network).

For the study coordinator, per trial: its identifiers and PlanDefinition version, a warning when
the definition is incomplete or holds drafted criteria nobody reviewed, the counts (screened,
eligible, insufficient data, ineligible, ResearchSubjects written and unchanged), the candidates
with links to their evidence on the server, an attrition chart (how many patients each criterion
ruled out), and the criteria most often ``unknown`` (the data the hospital is missing), with an
explanation when one is unknown for nearly everyone. A contents list links the trials. The file
holds patient data, so it is written owner-only (0600).

**The last picture is kept.** The report embeds its results (a JSON block). An incremental run
screens only the patients whose data changed; its report carries the earlier results of
everyone else forward, so the coordinator always sees the whole population. A run with nothing
to screen keeps the previous results and says "no changes since ...".
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import ValidationError

from . import __version__
from .client import FhirClient
from .errors import FatalNetworkError, NetworkError
from .match import MatchOutcome
from .model import Trial
from .results import CriterionResult, TrialResult
from .state import write_private_file

__all__ = [
    "REPORT_IDENTIFIERS",
    "ReportData",
    "TrialSection",
    "build_sections",
    "fetch_mrns",
    "mrns_of",
    "read_report_data",
    "render_report",
    "write_report",
]

log = logging.getLogger(__name__)

#: what ``--report-identifier`` may show beside each patient id
REPORT_IDENTIFIERS = ("none", "mrn")
#: a criterion unknown for at least this share of the screened patients gets an explanation
NEARLY_EVERYONE = 0.8
_DATA_ID = "fhirmatch-report-data"
_DATA_VERSION = 1
_DATA_RE = re.compile(
    rf'<script type="application/json" id="{_DATA_ID}">(?P<json>.*?)</script>', re.DOTALL
)


@dataclass
class ReportData:
    """What a report embeds so the next run can keep its picture."""

    #: every (patient, trial) result shown, as JSON
    results: list[TrialResult] = field(default_factory=list)
    #: server-side start of the run that last screened someone
    updated: str | None = None
    #: as-of date of that run
    as_of: str | None = None
    #: patient reference -> MRNs (only with ``--report-identifier mrn``)
    identifiers: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _DATA_VERSION,
            "updated": self.updated,
            "as_of": self.as_of,
            "results": [r.model_dump(mode="json", exclude_none=True) for r in self.results],
            "identifiers": self.identifiers,
        }


def read_report_data(path: Path) -> ReportData | None:
    """The data embedded in an earlier report at ``path``; None when there is none or it cannot
    be read (a damaged or foreign file is never fatal: the new report simply starts afresh)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("the previous report %s cannot be read (%s); starting afresh", path, exc)
        return None
    match = _DATA_RE.search(text)
    if match is None:
        log.warning("the previous report %s holds no fhirmatch data; starting afresh", path)
        return None
    try:
        raw = json.loads(match.group("json"))
        if not isinstance(raw, dict) or raw.get("version") != _DATA_VERSION:
            raise ValueError("unknown format")
        ids = raw.get("identifiers") or {}
        return ReportData(
            results=[TrialResult.model_validate(r) for r in raw.get("results") or []],
            updated=raw.get("updated"),
            as_of=raw.get("as_of"),
            identifiers={
                str(k): [str(x) for x in v] for k, v in ids.items() if isinstance(v, list)
            },
        )
    except (ValueError, ValidationError, AttributeError, TypeError) as exc:
        log.warning("the previous report %s has unreadable data (%s); starting afresh", path, exc)
        return None


@dataclass
class CriterionCount:
    id: str
    title: str
    kind: str
    count: int
    #: why it was unknown, grouped (only for the unknown list), most common first
    why: list[tuple[str, int]] = field(default_factory=list)
    #: set when the criterion is unknown for nearly everyone: what to check
    explanation: str | None = None


@dataclass
class TrialSection:
    study: str
    title: str
    screened: int
    anchor: str = ""
    identifiers: list[str] = field(default_factory=list)
    plan_definition: str = ""
    plan_version: str | None = None
    plan_url: str | None = None
    study_version: str | None = None
    #: what the trial's definition is known to lack (``definition-incomplete``), else None
    incomplete: str | None = None
    #: ids of drafted criteria nobody has reviewed yet
    drafted: list[str] = field(default_factory=list)
    eligible: list[TrialResult] = field(default_factory=list)
    insufficient: list[TrialResult] = field(default_factory=list)
    ineligible: int = 0
    attrition: list[CriterionCount] = field(default_factory=list)
    unknown: list[CriterionCount] = field(default_factory=list)
    written: int = 0
    unchanged: int = 0
    #: patients this run screened for the trial (the rest come from the previous picture)
    rescreened: int = 0

    @property
    def max_attrition(self) -> int:
        return max((c.count for c in self.attrition), default=0)

    @property
    def kept(self) -> int:
        return self.screened - self.rescreened


def _leaves(criteria: Iterable[CriterionResult]) -> Iterable[CriterionResult]:
    for c in criteria:
        yield c
        yield from _leaves(c.criteria)


def build_sections(
    outcome: MatchOutcome,
    trials: Sequence[Trial],
    results: Sequence[TrialResult] | None = None,
) -> list[TrialSection]:
    """One section per trial, its figures counted from ``results`` (default: the run's)."""
    if results is None:
        results = outcome.results
    rescreened_now = {(r.study, r.patient) for r in outcome.results}
    by_ref = {t.reference: t for t in trials}
    crit_titles: dict[str, dict[str, str]] = {}
    for t in trials:
        names: dict[str, str] = {}
        stack = list(t.criteria)
        while stack:
            c = stack.pop()
            names[c.id] = c.text
            stack.extend(c.children)
        crit_titles[t.reference] = names
    sections: dict[str, TrialSection] = {}
    fails: dict[str, Counter[tuple[str, str]]] = {}
    unknowns: dict[str, Counter[tuple[str, str]]] = {}
    whys: dict[str, dict[str, Counter[str]]] = {}
    for t in trials:
        summary = outcome.summaries.get(t.reference)
        plan = next((r for r in t.resources if r.get("resourceType") == "PlanDefinition"), {})
        rs = next((r for r in t.resources if r.get("resourceType") == "ResearchStudy"), {})
        sections[t.reference] = TrialSection(
            study=t.reference,
            title=t.title,
            screened=0,
            anchor="trial-" + re.sub(r"[^A-Za-z0-9_-]", "-", t.id),
            identifiers=[value for _system, value in t.identifiers],
            plan_definition=f"PlanDefinition/{t.plan_definition_id}",
            plan_version=t.version or plan.get("version"),
            plan_url=t.plan_definition_url,
            study_version=rs.get("version"),
            incomplete=t.incomplete,
            drafted=t.drafted_criteria(),
            written=summary.written if summary else 0,
            unchanged=summary.unchanged if summary else 0,
        )
        fails[t.reference] = Counter()
        unknowns[t.reference] = Counter()
        whys[t.reference] = {}
    for r in results:
        sec = sections.get(r.study)
        if sec is None:
            continue  # a trial no longer screened
        sec.screened += 1
        if (r.study, r.patient) in rescreened_now:
            sec.rescreened += 1
        if r.status == "eligible":
            sec.eligible.append(r)
        elif r.status == "insufficient-data":
            sec.insufficient.append(r)
        else:
            sec.ineligible += 1
        for res in r.criteria:  # top level: what decided the trial status
            if res.outcome == "fail":
                fails[r.study][(res.id, res.kind)] += 1
        for res in _leaves(r.criteria):
            if res.outcome == "unknown" and not res.criteria:
                unknowns[r.study][(res.id, res.kind)] += 1
                whys[r.study].setdefault(res.id, Counter())[_why(res.reason)] += 1
    for study, sec in sections.items():
        names = crit_titles.get(study, {})
        sec.attrition = [
            CriterionCount(cid, names.get(cid, cid), kind, n)
            for (cid, kind), n in fails[study].most_common()
        ]
        sec.unknown = []
        for (cid, kind), n in unknowns[study].most_common(10):
            why = whys[study].get(cid, Counter()).most_common()
            count = CriterionCount(cid, names.get(cid, cid), kind, n, why=why)
            if sec.screened >= 2 and n >= NEARLY_EVERYONE * sec.screened:
                count.explanation = _explain(n, sec.screened, why)
            sec.unknown.append(count)
    return [sections[t.reference] for t in trials if t.reference in by_ref]


_WINDOW = re.compile(r"within (\d+) days before")


def _why(reason: str) -> str:
    """The kind of reason a criterion was unknown, without the patient's own values."""
    text = reason or ""
    if "outside the window" in text or "older than" in text:
        m = _WINDOW.search(text)
        days = f" {m.group(1)}-day" if m else ""
        return f"only results older than the{days} look-back window"
    if "unusable" in text or "cannot" in text or "unknown unit" in text:
        return "a result that could not be read (value or unit)"
    if text.startswith("no record of"):
        m = _WINDOW.search(text)
        if m:
            return f"no result within the {m.group(1)}-day look-back window"
        return "no such record"
    # anything else: its wording, with numbers and dates taken out
    return re.sub(r"\d[\d.:T/-]*", "…", text)[:120] or "no reason given"


def _explain(n: int, screened: int, why: list[tuple[str, int]]) -> str:
    main, k = why[0] if why else ("no reason given", n)
    share = "all" if n == screened else f"{n} of {screened}"
    text = f"Unknown for {share} patients screened"
    if k == n:
        text += f": {main}."
    else:
        text += f"; most often ({k}): {main}."
    if "older than" in main:
        text += (
            " Results exist but are too old for this criterion: check that the laboratory feed"
            " is current and that the as-of date is the one intended."
        )
    elif "look-back window" in main:
        text += (
            " Check that these results reach the FHIR server (laboratory interface, codes"
            " mapped in mappings/) and that the as-of date is the one intended."
        )
    elif "could not be read" in main:
        text += " Check the units and value formats the source system sends."
    return text


def _environment() -> Environment:
    return Environment(
        loader=PackageLoader("fhirmatch", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _data_block(data: ReportData) -> str:
    text = json.dumps(data.to_json(), ensure_ascii=True, separators=(",", ":"))
    # no markup inside the <script> block: "<" ">" "&" as JSON escapes, which decode the same
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_report(
    outcome: MatchOutcome,
    trials: Sequence[Trial],
    *,
    server: str | None = None,
    parameters: dict[str, Any] | None = None,
    previous: ReportData | None = None,
    identifiers: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The report as an HTML string: per trial the candidates with links to their evidence on
    ``server``, the attrition chart and the most often unknown criteria; then the skipped
    patients and the run's ``parameters``. Nothing in it loads from the network.

    For an incremental run, ``previous`` (the data of the last report, :func:`read_report_data`)
    supplies the results of the patients this run did not re-screen. ``identifiers`` (patient
    reference -> MRNs) are shown beside the patient ids when given."""
    data = picture(outcome, previous, identifiers)
    no_changes = outcome.incremental and not outcome.results and not outcome.skipped
    template = _environment().get_template("report.html.j2")
    return template.render(
        outcome=outcome,
        sections=build_sections(outcome, trials, data.results),
        server=(server or "").rstrip("/"),
        parameters=parameters or {},
        version=__version__,
        data=data,
        data_json=_data_block(data),
        previous=previous,
        no_changes=no_changes,
        carried=outcome.incremental and previous is not None,
        identifiers=data.identifiers,
    )


def picture(
    outcome: MatchOutcome,
    previous: ReportData | None,
    identifiers: Mapping[str, Sequence[str]] | None = None,
) -> ReportData:
    """The results the report shows: this run's, plus, for an incremental run, the previous
    report's results of every patient this run did not re-screen."""
    results = list(outcome.results)
    updated: str | None = outcome.started
    as_of: str | None = outcome.as_of.isoformat()
    ids: dict[str, list[str]] = {}
    if outcome.incremental and previous is not None:
        done = {(r.study, r.patient) for r in results}
        results.extend(r for r in previous.results if (r.study, r.patient) not in done)
        if not outcome.results:
            updated, as_of = previous.updated, previous.as_of
        if identifiers is not None:
            ids.update(previous.identifiers)
    if identifiers is not None:
        ids.update({k: list(v) for k, v in identifiers.items()})
        shown = {r.patient for r in results}
        ids = {k: v for k, v in ids.items() if k in shown}
    return ReportData(results=results, updated=updated, as_of=as_of, identifiers=ids)


def write_report(
    path: Path,
    outcome: MatchOutcome,
    trials: Sequence[Trial],
    *,
    server: str | None = None,
    parameters: dict[str, Any] | None = None,
    identifiers: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Render and write the report, owner-only. An incremental run keeps the picture of the
    report already at ``path`` for the patients it did not re-screen."""
    params = dict(parameters or {})
    previous = read_report_data(Path(path)) if outcome.incremental else None
    html = render_report(
        outcome,
        trials,
        server=server or params.get("server"),
        parameters=params,
        previous=previous,
        identifiers=identifiers,
    )
    write_private_file(Path(path), html.encode("utf-8"))


def mrns_of(patient: Mapping[str, Any]) -> list[str]:
    """The MRNs of a Patient resource: its identifiers of type MR (HL7 v2 table 0203)."""
    out: list[str] = []
    for ident in patient.get("identifier") or []:
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        codings = ((ident.get("type") or {}).get("coding")) or []
        if any(
            isinstance(c, dict)
            and c.get("code") == "MR"
            and c.get("system") in (None, "http://terminology.hl7.org/CodeSystem/v2-0203")
            for c in codings
        ):
            out.append(ident["value"])
    return out


def fetch_mrns(
    client: FhirClient, patients: Iterable[str], chunk: int = 50
) -> dict[str, list[str]]:
    """MRNs of these patients (``Patient/id`` references) read from the server, for
    ``--report-identifier mrn``. A failed read leaves those patients without one (logged by
    count); it never fails the run."""
    ids = sorted({p.removeprefix("Patient/") for p in patients})
    out: dict[str, list[str]] = {}
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        try:
            for patient in client.iter_resources("Patient", {"_id": ",".join(part)}):
                mrns = mrns_of(patient)
                if mrns and isinstance(patient.get("id"), str):
                    out[f"Patient/{patient['id']}"] = mrns
        except NetworkError as exc:
            if isinstance(exc, FatalNetworkError) and exc.status in (401, 403):
                raise
            log.warning("could not read the MRNs of %d patients: %s", len(part), exc.message)
    return out
