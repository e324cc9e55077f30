"""Load, compile and check trial definitions (ResearchStudy + PlanDefinition, see
``docs/trial-format.md``).

:func:`load_trials` reads files or directories (Bundles or loose resources, ``.json`` or
``.json.gz``), pairs each ResearchStudy with the PlanDefinition its ``protocol`` names and compiles
them into :class:`fhirmatch.model.Trial` objects: every input's ValueSet is expanded through
:class:`fhirmatch.terminology.Terminology`, every FHIRPath condition is parsed, every target unit
is parsed as UCUM. A definition with problems raises :class:`TrialDefinitionError` listing *all*
of them, so an author fixes a file in one round.

:func:`check_trials` does the same plus FHIR R4 validation of every resource (``fhir.resources``
R4B models) and returns a :class:`CheckReport` instead of raising, for ``fhirmatch trials check``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import data
from .errors import (
    DataFileError,
    FhirmatchError,
    TerminologyError,
    TrialDefinitionError,
    UnitError,
)
from .model import (
    CS_CRITERION_KIND,
    EXT_AFTER_START_OF,
    EXT_ANALYTE,
    EXT_ANSWER_WORDINGS,
    EXT_BASE,
    EXT_CLINICAL_STATUS,
    EXT_DEFINITION_INCOMPLETE,
    EXT_DRAFTED,
    EXT_MANUAL_REVIEW,
    EXT_NEGATIVE_THRESHOLD,
    EXT_POSITIVE_IF_QUANTIFIED,
    EXT_POSITIVE_THRESHOLD,
    EXT_QUALITATIVE,
    EXT_REQUIRED,
    EXT_REVIEW_TEXT_DIAGNOSES,
    EXT_TARGET_UNIT,
    ClinicalStatusNeed,
    Criterion,
    CriterionKind,
    DataInput,
    Selection,
    Threshold,
    Trial,
    answers_value_set,
)

if TYPE_CHECKING:
    from .terminology import Terminology

__all__ = [
    "BUILTIN_VARIABLES",
    "EXT_NOTE",
    "KNOWN_CODE_SYSTEMS",
    "CheckReport",
    "TrialResources",
    "check_trials",
    "code_literals",
    "compile_trial",
    "computable_leaves",
    "default_mappings_dir",
    "default_trials_paths",
    "definition_incomplete",
    "fhirpath_problems",
    "fhirpath_variables",
    "load_trial_resources",
    "load_trials",
    "member_of_urls",
    "trial_warnings",
    "value_sets_used",
]

#: free-text modelling note on an action (``valueMarkdown``); becomes :attr:`Criterion.note`
EXT_NOTE = f"{EXT_BASE}/note"

#: variables every condition may use besides its inputs (fhirmatch's and FHIRPath's own)
BUILTIN_VARIABLES = frozenset(
    {"patient", "age", "asOf", "ucum", "sct", "loinc", "context", "resource", "rootResource"}
)

#: code systems the ValueSets may draw from; anything else is a typo or an unreviewed addition
KNOWN_CODE_SYSTEMS = frozenset(
    {
        "http://loinc.org",
        "http://snomed.info/sct",
        "http://hl7.org/fhir/sid/icd-10-cm",
        "http://hl7.org/fhir/sid/icd-10",
        "http://www.nlm.nih.gov/research/umls/rxnorm",
        "http://www.whocc.no/atc",
        "https://fhirmatch.dev/fhir/CodeSystem/medication-ingredient",
        # scores with no standard code (the G8), filled in by a site's ConceptMap
        "https://fhirmatch.dev/fhir/CodeSystem/geriatric-assessment",
        "http://www.ama-assn.org/go/cpt",
        "http://cancerstaging.org",
        "http://terminology.hl7.org/CodeSystem/icd-o-3",
        "http://ncithesaurus-stage.nci.nih.gov",
        "http://unitsofmeasure.org",
        "http://hl7.org/fhir/administrative-gender",
        "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
        "http://terminology.hl7.org/CodeSystem/condition-clinical",
    }
)

#: R4 ResearchStudy.status codes (fhir.resources does not check required bindings)
STUDY_STATUSES = frozenset(
    {
        "active",
        "administratively-completed",
        "approved",
        "closed-to-accrual",
        "closed-to-accrual-and-intervention",
        "completed",
        "disapproved",
        "in-review",
        "temporarily-closed-to-accrual",
        "temporarily-closed-to-accrual-and-intervention",
        "withdrawn",
    }
)

INPUT_TYPES = frozenset(
    {
        "Observation",
        "Condition",
        "Procedure",
        "MedicationRequest",
        "MedicationStatement",
        "MedicationAdministration",
        "MedicationDispense",
        "AllergyIntolerance",
    }
)
MEDICATION_TYPES = frozenset(
    {"MedicationRequest", "MedicationStatement", "MedicationAdministration", "MedicationDispense"}
)
#: elements a second ``codeFilter`` may name (each must hold a code of its ValueSet too)
EXTRA_FILTER_PATHS = frozenset({"bodySite"})
CLINICAL_STATUS_VALUES = ("current", "history", "any")
#: days per UCUM duration unit accepted in ``dateFilter.valueDuration`` (mo = 30 d, a = 365 d)
DURATION_DAYS = {"d": 1, "wk": 7, "mo": 30, "a": 365}
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KNOWN_EXTENSIONS_INPUT = {
    EXT_TARGET_UNIT,
    EXT_ANALYTE,
    EXT_CLINICAL_STATUS,
    EXT_REQUIRED,
    EXT_QUALITATIVE,
    EXT_POSITIVE_THRESHOLD,
    EXT_NEGATIVE_THRESHOLD,
    EXT_POSITIVE_IF_QUANTIFIED,
    EXT_AFTER_START_OF,
    EXT_REVIEW_TEXT_DIAGNOSES,
    EXT_ANSWER_WORDINGS,
}
#: ValueSets the engine itself reads (the qualitative-result reader)
ENGINE_VALUE_SETS = frozenset(
    {
        "https://fhirmatch.dev/fhir/ValueSet/positive-result",
        "https://fhirmatch.dev/fhir/ValueSet/negative-result",
    }
)


def default_mappings_dir() -> Path:
    """The mapping tables (ValueSets, analytes): :func:`fhirmatch.data.mappings_dir`."""
    return data.mappings_dir()


def default_trials_paths() -> list[Path]:
    """Where trials are read from by default: ``$FHIRMATCH_TRIALS`` (``os.pathsep``-separated)
    if set, else the bundled seed trials (:func:`fhirmatch.data.default_trial_paths`)."""
    return data.default_trial_paths()


# --------------------------------------------------------------------------------------------
# reading files


@dataclass
class TrialResources:
    """The resources of one trial as found in the files: its study, plan and bundled ValueSets."""

    source: str
    study: dict[str, Any]
    plan: dict[str, Any]
    value_sets: list[dict[str, Any]] = field(default_factory=list)


def _iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.name.endswith((".json", ".json.gz")):
                    yield child
        elif path.exists():
            yield path
        else:
            raise TrialDefinitionError(str(path), ["no such file or directory"])


def _read_json(path: Path) -> Any:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return json.load(fh)
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as exc:
        raise TrialDefinitionError(str(path), [f"cannot read JSON: {exc}"]) from exc


def _resources_of(doc: Any) -> list[dict[str, Any]]:
    if not isinstance(doc, dict) or "resourceType" not in doc:
        return []
    if doc["resourceType"] == "Bundle":
        out: list[dict[str, Any]] = []
        for entry in doc.get("entry") or []:
            res = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(res, dict):
                out.extend(_resources_of(res))
        return out
    return [doc]


def _read_all(paths: Iterable[str | Path]) -> list[tuple[str, list[dict[str, Any]]]]:
    return [(str(f), _resources_of(_read_json(f))) for f in _iter_files(paths)]


def _pair(
    files: Sequence[tuple[str, list[dict[str, Any]]]],
) -> tuple[list[TrialResources], dict[str, list[str]]]:
    """Pair every ResearchStudy with the PlanDefinition of its ``protocol`` (found in any file)."""
    plans: dict[str, tuple[str, dict[str, Any]]] = {}
    plan_urls: dict[str, str] = {}
    value_sets: dict[str, list[dict[str, Any]]] = {}
    problems: dict[str, list[str]] = {}
    for source, resources in files:
        for res in resources:
            if res.get("resourceType") == "PlanDefinition" and res.get("id"):
                plans[str(res["id"])] = (source, res)
                if res.get("url"):
                    plan_urls[str(res["url"])] = str(res["id"])
            elif res.get("resourceType") == "ValueSet":
                value_sets.setdefault(source, []).append(res)
    out: list[TrialResources] = []
    for source, resources in files:
        for res in resources:
            if res.get("resourceType") != "ResearchStudy":
                continue
            sid = res.get("id", "?")
            refs = [
                p.get("reference", "") for p in res.get("protocol") or [] if isinstance(p, dict)
            ]
            plan = None
            for ref in refs:
                key = ref.split("/", 1)[1] if ref.startswith("PlanDefinition/") else ref
                key = plan_urls.get(key, key)
                if key in plans:
                    plan = plans[key][1]
                    break
            if plan is None:
                problems.setdefault(source, []).append(
                    f"ResearchStudy/{sid}: protocol {refs or '(none)'} names no PlanDefinition "
                    "found in the given files"
                )
                continue
            out.append(TrialResources(source, res, plan, value_sets.get(source, [])))
    return out, problems


def load_trial_resources(paths: Iterable[str | Path]) -> list[TrialResources]:
    """Read the files and return each trial's resources, uncompiled.

    Raises :class:`TrialDefinitionError` for unreadable files and studies without a plan.
    """
    pairs, problems = _pair(_read_all(paths))
    for source, probs in problems.items():
        raise TrialDefinitionError(source, probs)
    return pairs


# --------------------------------------------------------------------------------------------
# FHIRPath


def fhirpath_problems(expression: str) -> list[str]:
    """Syntax problems of a FHIRPath expression (empty list when it parses completely).

    ``fhirpathpy.compile`` recovers silently from most syntax errors, so the expression is parsed
    with the same ANTLR grammar and an error listener that records every error, and the whole
    input must be consumed. The parse is kept (:func:`fhirmatch.fhirpath.parse_expression`): the
    engine compiles the condition from it without parsing again.
    """
    from .fhirpath import parse_expression

    return list(parse_expression(expression).problems)


_STRING = re.compile(r"'(?:[^'\\]|\\.)*'")
_VAR = re.compile(r"%(?:([A-Za-z_][A-Za-z0-9_]*)|`([^`]*)`)")


def fhirpath_variables(expression: str) -> set[str]:
    """Names of the ``%variables`` an expression uses (string literals ignored)."""
    text = _STRING.sub("''", expression)
    return {m.group(1) or m.group(2) for m in _VAR.finditer(text)}


def _tree_children(node: dict[str, Any]) -> list[dict[str, Any]]:
    return list(node.get("children") or [])


def _function_name(node: dict[str, Any]) -> str | None:
    """The name of a ``FunctionInvocation``/``Functn`` node."""
    if node.get("type") == "FunctionInvocation":
        kids = _tree_children(node)
        node = kids[0] if kids else {}
    if node.get("type") == "Functn":
        kids = _tree_children(node)
        if kids and kids[0].get("type") == "Identifier":
            return str(kids[0].get("text"))
    return None


def _last_member(node: dict[str, Any]) -> str | None:
    """``url`` for ``url`` or ``extension.url``: the last member name a path ends with."""
    while True:
        kind = node.get("type")
        kids = _tree_children(node)
        if kind == "Identifier":
            return str(node.get("text"))
        if kind == "InvocationExpression" and len(kids) == 2:
            node = kids[1]
        elif kind in ("TermExpression", "InvocationTerm", "MemberInvocation") and len(kids) == 1:
            node = kids[0]
        else:
            return None


def _string_literals(node: dict[str, Any], allowed: bool, out: list[tuple[str, bool]]) -> None:
    kind = node.get("type")
    kids = _tree_children(node)
    if kind == "StringLiteral":
        out.append((str(node.get("text", "")), allowed))
        return
    if kind == "Functn" and _function_name(node) == "memberOf":
        for kid in kids:
            _string_literals(kid, True, out)
        return
    if kind == "EqualityExpression" and len(kids) == 2:
        # ``extension.where(url = '...')``: an extension URL, not a code
        is_url = [_last_member(k) == "url" for k in kids]
        for kid, other_is_url in zip(kids, reversed(is_url), strict=True):
            _string_literals(kid, allowed or other_is_url, out)
        return
    for kid in kids:
        _string_literals(kid, allowed, out)


def _parse_tree(expression: str) -> dict[str, Any] | None:
    """fhirpathpy's syntax tree of a condition (None when it does not parse; syntax errors are
    reported by :func:`fhirpath_problems`): the parse
    :func:`fhirmatch.fhirpath.parse_expression` keeps, so that each condition is parsed once
    (callers only read it)."""
    from .fhirpath import parse_expression

    return parse_expression(expression).tree


def code_literals(expression: str) -> list[str]:
    """String literals of a condition that are codes (criteria must name ValueSets instead).

    Allowed: the ValueSet URL of ``memberOf('...')`` and an extension URL compared with ``url``
    (``extension.where(url = '...')``). Anything else (``code = 'C61'``, ``'POS'``,
    ``startsWith('C61')``, clinical-status codes) is a code literal.
    """
    tree = _parse_tree(expression)
    if tree is None:
        return []
    found: list[tuple[str, bool]] = []
    _string_literals(tree, False, found)
    return [text for text, allowed in found if not allowed]


def member_of_urls(expression: str) -> list[str]:
    """The ValueSet URLs a condition names with ``memberOf('...')``."""
    tree = _parse_tree(expression)
    if tree is None:
        return []
    found: list[tuple[str, bool]] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("type") == "Functn" and _function_name(node) == "memberOf":
            _string_literals(node, True, found)
            return
        for kid in _tree_children(node):
            walk(kid)

    walk(tree)
    return [text.strip("'") for text, _allowed in found]


def value_sets_used(trials: Iterable[Trial]) -> set[str]:
    """Canonical URLs of the ValueSets the trials' criteria name (inputs, their further code
    filters such as a body site, and ``memberOf``)."""
    used: set[str] = set()

    def walk(criteria: Iterable[Criterion]) -> None:
        for c in criteria:
            used.update(i.value_set.split("|", 1)[0] for i in c.inputs if i.value_set)
            used.update(url.split("|", 1)[0] for i in c.inputs for _path, url in i.extra_filters)
            if c.expression:
                used.update(member_of_urls(c.expression))
            walk(c.children)

    for trial in trials:
        walk(trial.criteria)
    return used


def computable_leaves(trials: Iterable[Trial]) -> tuple[int, int]:
    """(computable, all) leaf criteria (groups are not counted, their sub-criteria are)."""
    done = total = 0

    def walk(criteria: Iterable[Criterion]) -> None:
        nonlocal done, total
        for c in criteria:
            if c.is_group:
                walk(c.children)
                continue
            total += 1
            done += not c.is_manual

    for trial in trials:
        walk(trial.criteria)
    return done, total


# --------------------------------------------------------------------------------------------
# compiling


def _ext(element: dict[str, Any], url: str) -> dict[str, Any] | None:
    for ext in element.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == url:
            return ext
    return None


def _kind_of(action: dict[str, Any]) -> str | None:
    for cc in action.get("code") or []:
        for coding in cc.get("coding") or []:
            if coding.get("system") == CS_CRITERION_KIND:
                return str(coding.get("code"))
    return None


def _drafted_span(action: dict[str, Any], text: str) -> str:
    """The text span a drafted action came from (``span`` sub-extension), else its wording."""
    ext = _ext(action, EXT_DRAFTED) or {}
    span = _ext(ext, "span")
    return str(span.get("valueString")) if span and span.get("valueString") else text


def definition_incomplete(plan: dict[str, Any]) -> str | None:
    """What a PlanDefinition's ``definition-incomplete`` extension says is missing, or None."""
    ext = _ext(plan, EXT_DEFINITION_INCOMPLETE)
    if ext is None:
        return None
    text = str(ext.get("valueMarkdown") or ext.get("valueString") or "").strip()
    return text or "the definition is marked incomplete (no reason given)"


def _load_analytes() -> set[str] | None:
    """Analyte codes known to :mod:`fhirmatch.units` (``mappings/analytes.json``)."""
    from .units import known_analytes

    return set(known_analytes())


class _Compiler:
    """Compiles one PlanDefinition, collecting problems instead of stopping at the first."""

    def __init__(self, terminology: Terminology | None, analytes: set[str] | None) -> None:
        self.terminology = terminology
        self.analytes = analytes
        self.problems: list[str] = []
        self.ids: set[str] = set()

    def problem(self, where: str, text: str) -> None:
        self.problems.append(f"{where}: {text}")

    def action(
        self, action: dict[str, Any], inherited: CriterionKind | None, where: str
    ) -> Criterion:
        aid = str(action.get("id") or "")
        here = f"{where}action[{aid or '?'}]"
        if not aid:
            self.problem(here, "action has no id")
        elif aid in self.ids:
            self.problem(here, f"duplicate action id {aid!r}")
        self.ids.add(aid)
        text = str(action.get("description") or "")
        if not text.strip():
            self.problem(here, "description (the criterion's original wording) is missing")
        kind = _kind_of(action)
        if inherited is not None and kind is not None and kind != inherited:
            self.problem(here, f"kind {kind!r} differs from its group's kind {inherited!r}")
        raw_kind = kind or inherited
        if raw_kind not in ("inclusion", "exclusion"):
            self.problem(here, "kind must be coded as inclusion or exclusion (criterion-kind)")
            raw_kind = "inclusion"
        kind = cast(CriterionKind, raw_kind)
        note_ext = _ext(action, EXT_NOTE)
        notes = (
            [str(note_ext.get("valueMarkdown") or note_ext.get("valueString"))] if note_ext else []
        )
        for doc in action.get("documentation") or []:
            cite = " ".join(str(doc[k]) for k in ("citation", "display", "url") if doc.get(k))
            if cite:
                notes.append(f"Source: {cite}")
        note = "\n".join(notes) or None
        drafted = _drafted_span(action, text) if _ext(action, EXT_DRAFTED) else None

        manual = _ext(action, EXT_MANUAL_REVIEW)
        children_raw = action.get("action") or []
        conditions = action.get("condition") or []
        inputs_raw = action.get("input") or []
        if children_raw:
            if manual or conditions or inputs_raw:
                self.problem(here, "a group carries no input, condition or manual-review itself")
            raw_sel = action.get("selectionBehavior") or "all"
            if raw_sel not in ("all", "any"):
                self.problem(here, f"selectionBehavior {raw_sel!r}: use 'all' or 'any'")
                raw_sel = "all"
            selection = cast(Selection, raw_sel)
            children = tuple(self.action(c, kind, f"{here}.") for c in children_raw)
            return Criterion(
                id=aid,
                kind=kind,
                text=text,
                children=children,
                selection=selection,
                note=note,
                drafted=drafted,
            )
        if manual is not None:
            reason = str(manual.get("valueString") or "").strip()
            if not reason:
                self.problem(here, "manual-review extension without a reason (valueString)")
                reason = "(no reason given)"
            if conditions or inputs_raw:
                self.problem(here, "a manual criterion has no input and no condition")
            return Criterion(
                id=aid, kind=kind, text=text, manual_reason=reason, note=note, drafted=drafted
            )
        if not conditions:
            self.problem(
                here, "neither computable (no condition) nor manual (no manual-review reason)"
            )
            return Criterion(id=aid, kind=kind, text=text, manual_reason="(invalid)", note=note)
        if len(conditions) != 1:
            self.problem(here, "exactly one applicability condition is expected")
        cond = conditions[0]
        expr_el = cond.get("expression") or {}
        if cond.get("kind") != "applicability":
            self.problem(here, f"condition kind {cond.get('kind')!r}: use 'applicability'")
        if expr_el.get("language") != "text/fhirpath":
            self.problem(here, f"condition language {expr_el.get('language')!r}: use text/fhirpath")
        expression = str(expr_el.get("expression") or "")
        syntax = fhirpath_problems(expression)
        for p in syntax:
            self.problem(here, f"FHIRPath {expression!r}: {p}")
        if not syntax:
            literals = code_literals(expression)
            if literals:
                self.problem(
                    here,
                    f"code literal(s) {', '.join(dict.fromkeys(literals))} in the condition: "
                    "put the codes in a ValueSet and name it with memberOf('<ValueSet URL>')",
                )
            for url in member_of_urls(expression):
                if self.terminology is not None and url not in self.terminology:
                    self.problem(here, f"memberOf('{url}'): no such ValueSet")
                elif self.terminology is not None:
                    self.expand(url, here)
        inputs: list[DataInput] = []
        names: set[str] = set()
        for i, dr in enumerate(inputs_raw):
            di = self.data_input(dr, f"{here}.input[{i}]")
            if di.name in names:
                self.problem(here, f"duplicate input id {di.name!r}")
            elif di.name in self.ids:
                self.problem(
                    here,
                    f"input id {di.name!r} is already used in this PlanDefinition "
                    "(FHIR element ids are unique within a resource)",
                )
            names.add(di.name)
            self.ids.add(di.name)
            inputs.append(di)
        inputs = self.link_after(inputs_raw, inputs, here)
        for var in sorted(fhirpath_variables(expression) - names - BUILTIN_VARIABLES):
            self.problem(here, f"FHIRPath uses %{var}, which is neither an input id nor built in")
        anchors = {ref.name for i in inputs for ref in i.after}
        for unused in sorted(names - fhirpath_variables(expression) - anchors):
            self.problem(here, f"input {unused!r} is not used by the condition")
        return Criterion(
            id=aid,
            kind=kind,
            text=text,
            expression=expression,
            inputs=tuple(inputs),
            note=note,
            drafted=drafted,
        )

    def link_after(
        self, raw: list[dict[str, Any]], inputs: list[DataInput], where: str
    ) -> list[DataInput]:
        """Attach the inputs each ``after-start-of`` extension names (same criterion, no chains)."""
        by_name = {i.name: i for i in inputs}
        out: list[DataInput] = []
        for dr, di in zip(raw, inputs, strict=True):
            names = [
                str(x.get("valueString") or "")
                for x in dr.get("extension") or []
                if isinstance(x, dict) and x.get("url") == EXT_AFTER_START_OF
            ]
            refs: list[DataInput] = []
            for name in names:
                ref = by_name.get(name)
                if ref is None or name == di.name:
                    self.problem(
                        where,
                        f"input {di.name!r}: after-start-of {name!r} is not "
                        "another input of this criterion",
                    )
                elif ref.after or any(
                    x.get("url") == EXT_AFTER_START_OF
                    for r in raw
                    if r.get("id") == name
                    for x in r.get("extension") or []
                ):
                    self.problem(
                        where,
                        f"input {di.name!r}: after-start-of {name!r}, which "
                        "itself has after-start-of",
                    )
                else:
                    refs.append(ref)
            out.append(replace(di, after=tuple(refs)) if refs else di)
        return out

    def data_input(self, dr: dict[str, Any], where: str) -> DataInput:
        name = str(dr.get("id") or "")
        if not _VAR_NAME.match(name):
            self.problem(where, f"input id {name!r} is not a FHIRPath variable name")
        rtype = str(dr.get("type") or "")
        if rtype not in INPUT_TYPES:
            self.problem(where, f"type {rtype!r} is not one of {', '.join(sorted(INPUT_TYPES))}")
        for ext in dr.get("extension") or []:
            if ext.get("url") not in _KNOWN_EXTENSIONS_INPUT:
                self.problem(where, f"unknown extension {ext.get('url')!r}")
        filters = dr.get("codeFilter") or []
        value_set = None
        code_path = "medication" if rtype in MEDICATION_TYPES else "code"
        codes: frozenset[tuple[str, str]] = frozenset()
        possible: frozenset[tuple[str, str]] = frozenset()
        if not filters or not filters[0].get("valueSet"):
            self.problem(where, "codeFilter[0].valueSet is required")
        else:
            value_set = str(filters[0]["valueSet"])
            code_path = str(filters[0].get("path") or code_path)
            codes = self.expand(value_set, where)
            if rtype in MEDICATION_TYPES and self.terminology is not None:
                # the ValueSet names ingredients; the medicine tables say how records code them
                certain, possible = self.terminology.medication_codes(codes)
                codes = codes | certain
        extra_filters: list[tuple[str, str]] = []
        for n, flt in enumerate(filters[1:], start=1):
            path, url = flt.get("path"), flt.get("valueSet")
            if path not in EXTRA_FILTER_PATHS or not url:
                self.problem(
                    where,
                    f"codeFilter[{n}] needs path {' or '.join(sorted(EXTRA_FILTER_PATHS))} "
                    "and a valueSet",
                )
                continue
            self.expand(str(url), where)
            extra_filters.append((str(path), str(url)))
        lookback = None
        for df in dr.get("dateFilter") or []:
            dur = df.get("valueDuration")
            if dur is None:
                self.problem(where, "dateFilter needs valueDuration (look-back window)")
                continue
            unit = dur.get("code") or dur.get("unit")
            value = dur.get("value")
            if unit not in DURATION_DAYS or not isinstance(value, int | float) or value <= 0:
                self.problem(where, f"valueDuration {value!r} {unit!r}: use a positive d/wk/mo/a")
                continue
            lookback = round(value * DURATION_DAYS[unit])
        limit = dr.get("limit")
        if limit not in (None, 1):
            self.problem(where, f"limit {limit!r}: only 1 (latest result) is supported")
        unit_ext = _ext(dr, EXT_TARGET_UNIT)
        unit = str(unit_ext.get("valueCode")) if unit_ext else None
        unit_ok = unit is not None and self.check_unit(unit, where)
        analyte_ext = _ext(dr, EXT_ANALYTE)
        analyte = str(analyte_ext.get("valueCode")) if analyte_ext else None
        if analyte is not None and self.analytes is not None and analyte not in self.analytes:
            self.problem(where, f"analyte {analyte!r} is not in mappings/analytes.json")
        elif unit is not None and unit_ok:
            self.check_analyte_unit(unit, analyte, codes, where)
        if rtype == "Observation" and lookback is None and (limit == 1 or unit is not None):
            self.problem(
                where,
                "an Observation result with no look-back window (dateFilter valueDuration) "
                "would count results of any age; give the window the protocol states, or the "
                "one you choose (say so in a note)",
            )
        status_ext = _ext(dr, EXT_CLINICAL_STATUS)
        status = str(status_ext.get("valueCode")) if status_ext else "any"
        if status not in CLINICAL_STATUS_VALUES:
            self.problem(where, f"clinical-status {status!r}: use current, history or any")
            status = "any"
        req_ext = _ext(dr, EXT_REQUIRED)
        required = bool(req_ext.get("valueBoolean")) if req_ext else False
        threshold = self.threshold(dr, analyte, where)
        qual_ext = _ext(dr, EXT_QUALITATIVE)
        qualitative = threshold is not None or bool(qual_ext and qual_ext.get("valueBoolean"))
        if qualitative and rtype != "Observation":
            self.problem(where, "only Observations can be read as qualitative results")
        if qualitative and unit is not None:
            self.problem(where, "a qualitative input has no target unit (state a threshold)")
        answer_sets: list[str] = []
        for ext in dr.get("extension") or []:
            if isinstance(ext, dict) and ext.get("url") == EXT_ANSWER_WORDINGS:
                url = ext.get("valueCanonical")
                if not isinstance(url, str) or not url:
                    self.problem(where, "answer-wordings needs a valueCanonical (a ValueSet)")
                    continue
                self.expand(url, where)
                answer_sets.append(url.split("|", 1)[0])
        if answer_sets and (rtype != "Observation" or qualitative):
            self.problem(where, "answer-wordings is for Observation inputs not read as qualitative")
        text_ext = _ext(dr, EXT_REVIEW_TEXT_DIAGNOSES)
        text_systems: frozenset[str] = frozenset()
        if text_ext is not None and text_ext.get("valueBoolean") is True:
            if rtype != "Condition":
                self.problem(where, "review-text-diagnoses is for Condition inputs only")
            text_systems = frozenset(system for system, _code in codes)
        return DataInput(
            name=name,
            resource_type=rtype,
            value_set=value_set,
            codes=codes,
            possible_codes=possible,
            extra_filters=tuple(extra_filters),
            code_path=code_path,
            lookback_days=lookback,
            unit=unit,
            analyte=analyte,
            select="latest" if limit == 1 else "all",
            clinical_status=cast(ClinicalStatusNeed, status),
            required=required,
            qualitative=qualitative,
            threshold=threshold,
            text_systems=text_systems,
            answer_sets=tuple(answer_sets),
        )

    def threshold(self, dr: dict[str, Any], analyte: str | None, where: str) -> Threshold | None:
        """The positive/negative threshold extensions of a qualitative input, checked."""
        quantified = _ext(dr, EXT_POSITIVE_IF_QUANTIFIED)
        pos = _ext(dr, EXT_POSITIVE_THRESHOLD)
        neg = _ext(dr, EXT_NEGATIVE_THRESHOLD)
        if quantified is not None and quantified.get("valueBoolean"):
            if pos or neg:
                self.problem(where, "positive-if-quantified takes no other threshold")
            return Threshold(if_quantified=True, analyte=analyte)
        if pos is None:
            if neg is not None:
                self.problem(where, "negative-threshold needs a positive-threshold")
            return None
        q = pos.get("valueQuantity") or {}
        value = q.get("value")
        unit = q.get("code") or q.get("unit")
        comparator = q.get("comparator") or ">="
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.problem(where, "positive-threshold needs valueQuantity.value")
            return None
        if comparator not in (">=", ">"):
            self.problem(where, f"positive-threshold comparator {comparator!r}: use >= or >")
        if unit is not None:
            self.check_unit(str(unit), where)
        negative = None
        if neg is not None:
            nq = neg.get("valueQuantity") or {}
            nvalue = nq.get("value")
            if not isinstance(nvalue, int | float) or isinstance(nvalue, bool):
                self.problem(where, "negative-threshold needs valueQuantity.value")
            elif (nq.get("code") or nq.get("unit")) != unit:
                self.problem(where, "negative-threshold must use the positive threshold's unit")
            elif nvalue > value:
                self.problem(where, "negative-threshold is above the positive threshold")
            else:
                negative = float(nvalue)
        return Threshold(
            positive=float(value),
            unit=str(unit) if unit is not None else None,
            strict=comparator == ">",
            negative=negative,
            analyte=analyte,
        )

    def expand(self, url: str, where: str) -> frozenset[tuple[str, str]]:
        if self.terminology is None:
            return frozenset()
        try:
            codes = frozenset(self.terminology.expand(url))
        except (TerminologyError, KeyError, ValueError) as exc:
            self.problem(where, f"ValueSet {url}: {exc}")
            return frozenset()
        unknown = sorted({s for s, _ in codes} - KNOWN_CODE_SYSTEMS)
        if unknown:
            self.problem(where, f"ValueSet {url} uses unknown code systems {unknown}")
        if not codes:
            self.problem(where, f"ValueSet {url} expands to no codes")
        return codes

    def check_unit(self, unit: str, where: str) -> bool:
        from .units import parse_unit

        try:
            parse_unit(unit)
        except UnitError as exc:
            self.problem(where, f"target unit {unit!r} is not valid UCUM: {exc.reason}")
            return False
        return True

    def check_analyte_unit(
        self, unit: str, analyte: str | None, codes: frozenset[tuple[str, str]], where: str
    ) -> None:
        """The target unit must be reachable from the analyte's units: the named analyte's, or
        (without one) that of every analyte whose LOINC codes the input's ValueSet holds."""
        from .units import analyte_info, conversion_factor, known_analytes

        if analyte is not None:
            candidates = [analyte]
        else:
            loinc = {c for s, c in codes if s == "http://loinc.org"}
            candidates = [a for a in known_analytes() if loinc & set(analyte_info(a).loinc)]
        for code in candidates:
            info = analyte_info(code)
            if unit == "{score}" or unit in (info.unit, *info.other_units):
                continue
            reasons: list[str] = []
            for source in (info.unit, *info.other_units):
                try:
                    conversion_factor(source, unit, analyte=code)
                    break
                except UnitError as exc:
                    reasons.append(exc.reason)
            else:
                self.problem(
                    where,
                    f"target unit {unit!r} cannot be converted from {code}'s unit "
                    f"{info.unit!r} ({reasons[0]})",
                )


def compile_trial(
    study: dict[str, Any],
    plan: dict[str, Any],
    terminology: Terminology | None,
    *,
    source: str | None = None,
    resources: Sequence[dict[str, Any]] = (),
) -> Trial:
    """Compile a ResearchStudy and its PlanDefinition into a :class:`Trial`.

    ``terminology`` expands the inputs' ValueSets into :attr:`DataInput.codes` (``None`` leaves
    them empty and skips the ValueSet checks). Raises :class:`TrialDefinitionError` listing every
    problem found.
    """
    where = source or f"ResearchStudy/{study.get('id', '?')}"
    comp = _Compiler(terminology, _load_analytes())
    if study.get("resourceType") != "ResearchStudy" or not study.get("id"):
        comp.problem("ResearchStudy", "a ResearchStudy with an id is required")
    if study.get("status") not in STUDY_STATUSES:
        comp.problem("ResearchStudy", f"status {study.get('status')!r} is not an R4 status code")
    if plan.get("resourceType") != "PlanDefinition" or not plan.get("id"):
        comp.problem("PlanDefinition", "a PlanDefinition with an id is required")
    actions = plan.get("action") or []
    if not actions:
        comp.problem(f"PlanDefinition/{plan.get('id', '?')}", "no criteria (action) at all")
    criteria = tuple(comp.action(a, None, "") for a in actions)
    for a in actions:
        if _kind_of(a) is None:
            comp.problem(f"action[{a.get('id', '?')}]", "a top-level criterion needs its kind")
    if comp.problems:
        raise TrialDefinitionError(where, comp.problems)
    identifiers = tuple(
        (str(i.get("system", "")), str(i.get("value", "")))
        for i in study.get("identifier") or []
        if isinstance(i, dict)
    )
    return Trial(
        id=str(study["id"]),
        title=str(study.get("title") or study["id"]),
        identifiers=identifiers,
        criteria=criteria,
        plan_definition_id=str(plan["id"]),
        plan_definition_url=plan.get("url"),
        version=plan.get("version"),
        source=source,
        recruitment_status=study.get("status"),
        incomplete=definition_incomplete(plan),
        resources=(study, plan, *resources),
    )


def _default_terminology(extra_paths: Sequence[str | Path] = ()) -> Terminology:
    from .terminology import Terminology

    return Terminology.load([default_mappings_dir(), *extra_paths])


def load_trials(paths: Iterable[str | Path], terminology: Terminology | None = None) -> list[Trial]:
    """Load and compile every trial in ``paths`` (files or directories).

    Without ``terminology``, ValueSets come from the repository's ``mappings/`` plus any bundled in
    the trial files. Raises :class:`TrialDefinitionError` for the first file with problems (listing
    all of that file's problems), and when two trials share an id.
    """
    paths = list(paths)
    found = load_trial_resources(paths)
    if terminology is None:
        terminology = _default_terminology(sorted({t.source for t in found if t.value_sets}))
    trials: list[Trial] = []
    seen: dict[str, str] = {}
    for tr in found:
        trial = compile_trial(
            tr.study, tr.plan, terminology, source=tr.source, resources=tr.value_sets
        )
        if trial.id in seen:
            raise TrialDefinitionError(
                tr.source, [f"trial id {trial.id!r} is also defined in {seen[trial.id]}"]
            )
        seen[trial.id] = tr.source
        trials.append(trial)
    return trials


# --------------------------------------------------------------------------------------------
# checking


@dataclass
class CheckReport:
    """What ``fhirmatch trials check`` found: compiled trials and problems by source file."""

    trials: list[Trial] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)
    #: what does not stop a trial from loading but must be seen: incomplete definitions,
    #: drafted criteria nobody reviewed yet
    warnings: dict[str, list[str]] = field(default_factory=dict)
    #: ValueSets loaded (from ``mappings/`` and the trial files) that no criterion names, neither
    #: directly nor through another ValueSet, and the engine does not read: editing them changes
    #: nothing
    unused_value_sets: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, source: str, problems: Iterable[str]) -> None:
        probs = list(problems)
        if probs:
            self.problems.setdefault(source, []).extend(probs)


def _fhir_problems(resource: dict[str, Any]) -> list[str]:
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    rtype = str(resource.get("resourceType", ""))
    label = f"{rtype}/{resource.get('id', '?')}"
    try:
        model = get_fhir_model_class(rtype)
    except (KeyError, ValueError) as exc:
        return [f"{label}: unknown resource type ({exc})"]
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        return [
            f"{label}: invalid FHIR R4 at {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        ]
    return []


def check_trials(
    paths: Iterable[str | Path], terminology: Terminology | None = None
) -> CheckReport:
    """Check every trial definition in ``paths`` and report all problems; never raises for bad
    definitions.

    Checks: each resource is valid FHIR R4, each study has its plan, each ValueSet resolves and
    uses known code systems, each FHIRPath parses and uses only defined variables, each target
    unit is UCUM, each analyte is known, each criterion is computable or manual with a reason,
    and action ids and trial ids are unique.
    """
    report = CheckReport()
    paths = list(paths)
    files: list[tuple[str, list[dict[str, Any]]]] = []
    for f in _iter_files_checked(paths, report):
        try:
            files.append((str(f), _resources_of(_read_json(f))))
        except TrialDefinitionError as exc:
            report.add(exc.source, exc.problems)
    for source, resources in files:
        for res in resources:
            report.add(source, _fhir_problems(res))
    pairs, pair_problems = _pair(files)
    for source, probs in pair_problems.items():
        report.add(source, probs)
    if terminology is None:
        try:
            terminology = _default_terminology(sorted({t.source for t in pairs if t.value_sets}))
        except DataFileError:
            raise  # the tables themselves are missing: not a problem of these definitions
        except (FhirmatchError, ImportError) as exc:
            report.add(str(default_mappings_dir()), [f"cannot load the ValueSets: {exc}"])
    seen: dict[str, str] = {}
    for tr in pairs:
        try:
            trial = compile_trial(
                tr.study, tr.plan, terminology, source=tr.source, resources=tr.value_sets
            )
        except TrialDefinitionError as exc:
            report.add(tr.source, exc.problems)
            continue
        if trial.id in seen:
            report.add(tr.source, [f"trial id {trial.id!r} is also defined in {seen[trial.id]}"])
            continue
        seen[trial.id] = tr.source
        report.trials.append(trial)
        warnings = trial_warnings(trial)
        if warnings:
            report.warnings.setdefault(tr.source, []).extend(warnings)
    if terminology is not None and report.trials:
        report.unused_value_sets = sorted(
            terminology.value_set_urls - _closure(terminology, value_sets_used(report.trials))
        )
    return report


def trial_warnings(trial: Trial) -> list[str]:
    """What a user of ``trial`` must be told: an incomplete definition, unreviewed drafts."""
    out: list[str] = []
    if trial.incomplete:
        out.append(
            f"{trial.id}: definition incomplete: {' '.join(trial.incomplete.split())} "
            "(patients found eligible have passed only what is modelled)"
        )
    drafted = trial.drafted_criteria()
    if drafted:
        out.append(
            f"{trial.id}: {len(drafted)} criteria drafted automatically and not reviewed: "
            f"{', '.join(drafted)}"
        )
    return out


def _closure(terminology: Terminology, urls: Iterable[str]) -> set[str]:
    """``urls``, the engine's own ValueSets, the scored answers of those that are questions
    (``ecog-answers``), and every ValueSet they include, recursively."""
    urls = list(urls)
    answers = [answers_value_set(u) for u in urls]
    todo = [*urls, *ENGINE_VALUE_SETS, *(a for a in answers if a in terminology)]
    seen: set[str] = set()
    while todo:
        url = todo.pop()
        if url not in seen:
            seen.add(url)
            todo.extend(terminology.referenced_value_sets(url))
    return seen


def _iter_files_checked(paths: Sequence[str | Path], report: CheckReport) -> Iterator[Path]:
    for p in paths:
        try:
            yield from _iter_files([p])
        except TrialDefinitionError as exc:
            report.add(exc.source, exc.problems)
