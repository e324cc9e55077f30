"""The HTML report of a match run: one self-contained file (inline CSS and SVG, no network).

Per trial: the candidates with links to their evidence on the server, an attrition chart (how
many patients each criterion ruled out), the criteria most often ``unknown`` (the data the
hospital is missing), and the run's parameters. The file holds patient data, so it is written
owner-only (0600).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from . import __version__
from .match import MatchOutcome
from .model import Trial
from .results import CriterionResult, TrialResult
from .state import write_private_file


@dataclass
class CriterionCount:
    id: str
    title: str
    kind: str
    count: int


@dataclass
class TrialSection:
    study: str
    title: str
    screened: int
    eligible: list[TrialResult] = field(default_factory=list)
    insufficient: list[TrialResult] = field(default_factory=list)
    ineligible: int = 0
    attrition: list[CriterionCount] = field(default_factory=list)
    unknown: list[CriterionCount] = field(default_factory=list)
    written: int = 0
    #: what the trial's definition is known to lack (``definition-incomplete``), else None
    incomplete: str | None = None
    #: ids of drafted criteria nobody has reviewed yet
    drafted: list[str] = field(default_factory=list)

    @property
    def max_attrition(self) -> int:
        return max((c.count for c in self.attrition), default=0)


def _leaves(criteria: Iterable[CriterionResult]) -> Iterable[CriterionResult]:
    for c in criteria:
        yield c
        yield from _leaves(c.criteria)


def build_sections(outcome: MatchOutcome, trials: Sequence[Trial]) -> list[TrialSection]:
    titles = {t.reference: t.title for t in trials}
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
    for r in outcome.results:
        sec = sections.get(r.study)
        if sec is None:
            summary = outcome.summaries.get(r.study)
            trial = by_ref.get(r.study)
            sec = sections[r.study] = TrialSection(
                study=r.study,
                title=titles.get(r.study, r.study),
                screened=0,
                written=summary.written if summary else 0,
                incomplete=trial.incomplete if trial else r.incomplete,
                drafted=trial.drafted_criteria() if trial else list(r.drafted),
            )
            fails[r.study] = Counter()
            unknowns[r.study] = Counter()
        sec.screened += 1
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
    for study, sec in sections.items():
        names = crit_titles.get(study, {})
        sec.attrition = [
            CriterionCount(cid, names.get(cid, cid), kind, n)
            for (cid, kind), n in fails[study].most_common()
        ]
        sec.unknown = [
            CriterionCount(cid, names.get(cid, cid), kind, n)
            for (cid, kind), n in unknowns[study].most_common(10)
        ]
    return [sections[t.reference] for t in trials if t.reference in sections]


def render_report(
    outcome: MatchOutcome,
    trials: Sequence[Trial],
    *,
    server: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> str:
    """The report as an HTML string: per trial the candidates with links to their evidence on
    ``server``, the attrition chart and the most often unknown criteria; then the skipped
    patients and the run's ``parameters``. Nothing in it loads from the network."""
    env = Environment(
        loader=PackageLoader("fhirmatch", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    template = env.get_template("report.html.j2")
    return template.render(
        outcome=outcome,
        sections=build_sections(outcome, trials),
        server=(server or "").rstrip("/"),
        parameters=parameters or {},
        version=__version__,
    )


def write_report(
    path: Path,
    outcome: MatchOutcome,
    trials: Sequence[Trial],
    *,
    server: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> None:
    """Render and write the report, owner-only."""
    params = dict(parameters or {})
    html = render_report(outcome, trials, server=server or params.get("server"), parameters=params)
    write_private_file(Path(path), html.encode("utf-8"))
