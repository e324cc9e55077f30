"""A FHIR R4 REST client: reads, searches with paging, capabilities, writes, Bundles.

HTTP concerns (timeouts, retries, error sorting, where credentials go) live in
:mod:`fhirmatch.http`; this module adds FHIR meaning on top. Resources stay plain ``dict``s.

Paging follows the server's ``Bundle.link[relation=next]`` exactly as given (HAPI's
``?_getpages=...``, sekmet's ``_offset``), resolves relative links against the base, refuses links
to another scheme/host/port, and stops when a ``next`` link repeats.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from .auth import Auth, NoAuth
from .errors import (
    ConfigurationError,
    DataError,
    FatalNetworkError,
    PreconditionFailed,
)
from .http import (
    HttpTransport,
    RetryPolicy,
    Timeouts,
    TransportStats,
    json_body,
    redact_url,
    same_origin,
)
from .records import LONE_SURROGATE

log = logging.getLogger(__name__)

#: the least read timeout for ``GET /metadata`` (seconds)
METADATA_READ_TIMEOUT = 60.0

__all__ = [
    "Capabilities",
    "ClientConfig",
    "EntryOutcome",
    "FhirClient",
    "Params",
    "SearchResult",
    "bundle_is_retry_safe",
    "encode_params",
]

#: Search parameters: a mapping (a list value repeats the parameter) or (name, value) pairs.
Params = Mapping[str, str | int | Sequence[str]] | Sequence[tuple[str, str]]

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

#: Types searched by patient when ``$everything`` is not available.
DEFAULT_EVERYTHING_TYPES = (
    "Condition",
    "Observation",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationAdministration",
    "MedicationDispense",
    "Procedure",
    "AllergyIntolerance",
    "Encounter",
    "DiagnosticReport",
    "Immunization",
)


@dataclass(frozen=True)
class ClientConfig:
    """Everything needed to talk to one FHIR server; usable directly from CLI options."""

    base_url: str
    auth: Auth = field(default_factory=NoAuth)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_attempts: int = 5
    max_delay: float = 30.0
    retry_after_cap: float = 120.0
    verify: bool = True
    ca_bundle: str | None = None
    allow_insecure_http: bool = False
    user_agent: str | None = None
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    #: a query string longer than this is sent as ``POST [type]/_search`` with a form body
    max_get_query: int = 1800
    #: default ``_count`` for searches that do not set one
    page_size: int | None = None
    #: pooled connections: as many as threads sending at once (``--concurrency``)
    connections: int = 10

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigurationError("timeouts must be positive")
        if self.max_get_query < 100:
            raise ConfigurationError("max_get_query must be at least 100 characters")


@dataclass
class SearchResult:
    """All pages of a search: ``matches`` (search.mode match) and ``included`` resources."""

    matches: list[dict[str, Any]] = field(default_factory=list)
    included: list[dict[str, Any]] = field(default_factory=list)
    pages: int = 0
    total: int | None = None


@dataclass(frozen=True)
class EntryOutcome:
    """Outcome of one write (or one transaction/batch entry)."""

    status: int
    location: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    resource: dict[str, Any] | None = None
    outcome: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def id(self) -> str | None:
        """Logical id from the Location (``Type/id/_history/v``), else from the resource."""
        if self.location:
            parts = urlsplit(self.location).path.strip("/").split("/")
            if "_history" in parts:
                i = parts.index("_history")
                if i >= 1:
                    return parts[i - 1]
            if len(parts) >= 2:
                return parts[-1]
        if self.resource:
            rid = self.resource.get("id")
            return str(rid) if rid else None
        return None

    @property
    def version_id(self) -> str | None:
        """Version from the ETag (``W/"3"``) or the Location ``_history`` segment."""
        if self.etag:
            m = re.match(r'^(?:W/)?"?([^"]+)"?$', self.etag.strip())
            if m:
                return m.group(1)
        if self.location and "/_history/" in self.location:
            return self.location.rstrip("/").rsplit("/", 1)[-1]
        if self.resource:
            vid = (self.resource.get("meta") or {}).get("versionId")
            return str(vid) if vid else None
        return None


def encode_params(params: Params | None) -> list[tuple[str, str]]:
    """Normalise search parameters to ``(name, value)`` pairs, keeping order and repeats."""
    if not params:
        return []
    out: list[tuple[str, str]] = []
    items: Iterable[tuple[str, Any]] = params.items() if isinstance(params, Mapping) else params
    for name, value in items:
        if isinstance(value, str | int):
            out.append((name, str(value)))
        else:
            out.extend((name, str(v)) for v in value)
    return out


def _entry_is_retry_safe(entry: Mapping[str, Any]) -> bool:
    req = entry.get("request") or {}
    method = str(req.get("method", "")).upper()
    if method in ("GET", "HEAD", "DELETE"):
        return True
    if method == "PUT":
        # PUT with If-Match would fail with 412 on a resend after success: not a duplicate,
        # but a misleading error; count it as unsafe so the caller sees the real outcome.
        return not req.get("ifMatch")
    if method == "POST":
        return bool(req.get("ifNoneExist"))
    return False  # PATCH and anything unknown


def bundle_is_retry_safe(bundle: Mapping[str, Any]) -> bool:
    """True when resending the whole transaction/batch cannot create duplicates.

    A transaction whose response was lost (read timeout, 502 from a proxy) may have committed.
    Resending is harmless only if every entry is a read, a delete, a PUT without If-Match
    (update-as-create to a fixed id or a conditional update) or a conditional create
    (``ifNoneExist``). A plain POST create would be stored twice, so such Bundles are not
    retried after the request may have reached the server.
    """
    entries = bundle.get("entry") or []
    return all(_entry_is_retry_safe(e) for e in entries)


class Capabilities:
    """What a server's CapabilityStatement says it supports."""

    def __init__(self, statement: Mapping[str, Any]) -> None:
        self.statement = statement
        self.fhir_version: str = str(statement.get("fhirVersion") or "")
        self._types: dict[str, dict[str, Any]] = {}
        self._system_ops: set[str] = set()
        for rest in statement.get("rest") or []:
            if rest.get("mode", "server") != "server":
                continue
            for op in rest.get("operation") or []:
                self._system_ops.add(str(op.get("name", "")).lstrip("$"))
            for res in rest.get("resource") or []:
                rtype = res.get("type")
                if not rtype:
                    continue
                self._types[rtype] = {
                    "params": {str(p.get("name")) for p in res.get("searchParam") or []},
                    "ops": {str(o.get("name", "")).lstrip("$") for o in res.get("operation") or []},
                    "include": set(res.get("searchInclude") or []),
                    "revinclude": set(res.get("searchRevInclude") or []),
                    "interactions": {i.get("code") for i in res.get("interaction") or []},
                }

    @property
    def release(self) -> str:
        """``R4``, ``R4B``, ``R5`` or ``unknown`` from ``fhirVersion``."""
        v = self.fhir_version
        if v.startswith("4.0"):
            return "R4"
        if v.startswith("4.3"):
            return "R4B"
        if v.startswith("5.0"):
            return "R5"
        return "unknown"

    @property
    def resource_types(self) -> frozenset[str]:
        return frozenset(self._types)

    def supports_type(self, rtype: str) -> bool:
        return rtype in self._types

    def supports_search_param(self, rtype: str, name: str) -> bool:
        """True when the type lists the search parameter (``_id``/``_lastUpdated`` always count
        for listed types; ``_count``, ``_elements``, ``_include`` and the like are results
        parameters that every server handles or ignores)."""
        info = self._types.get(rtype)
        if info is None:
            return False
        if name in info["params"] or name in ("_id", "_lastUpdated"):
            return True
        return name in ("_count", "_elements", "_sort", "_summary", "_total")

    def supports_operation(self, rtype: str | None, name: str) -> bool:
        name = name.lstrip("$")
        if rtype is None:
            return name in self._system_ops
        info = self._types.get(rtype)
        return bool(info and name in info["ops"]) or name in self._system_ops

    def supports_revinclude(self, rtype: str, value: str) -> bool:
        """True when ``_revinclude=value`` is declared on ``rtype`` (or a ``*`` wildcard)."""
        info = self._types.get(rtype)
        return bool(info and (value in info["revinclude"] or "*" in info["revinclude"]))

    def supports_include(self, rtype: str, value: str) -> bool:
        info = self._types.get(rtype)
        return bool(info and (value in info["include"] or "*" in info["include"]))


class FhirClient:
    """A FHIR REST client bound to one server (one pooled session; not for sharing across
    processes; safe for use from several threads at once, which share its backoff)."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
    ) -> None:
        self.config = config
        self.transport = HttpTransport(
            config.base_url,
            auth=config.auth,
            timeouts=Timeouts(config.connect_timeout, config.read_timeout),
            retry=RetryPolicy(
                max_attempts=config.max_attempts,
                max_delay=config.max_delay,
                retry_after_cap=config.retry_after_cap,
            ),
            verify=config.verify,
            ca_bundle=config.ca_bundle,
            allow_insecure_http=config.allow_insecure_http,
            user_agent=config.user_agent,
            extra_headers=config.extra_headers,
            sleep=sleep,
            session=session,
            connections=config.connections,
        )
        self.base_url = self.transport.base_url
        self._capabilities: Capabilities | None = None

    def __repr__(self) -> str:
        return f"FhirClient(base_url={redact_url(self.base_url)!r}, auth={self.config.auth!r})"

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    @property
    def stats(self) -> TransportStats:
        """Request counters (``stats.requests`` counts every HTTP attempt, retries included)."""
        return self.transport.stats

    # ----------------------------------------------------------------- capabilities

    def capabilities(self) -> Capabilities:
        """The server's CapabilityStatement (``GET /metadata``, read once and cached)."""
        if self._capabilities is None:
            # read once per run, and slow to build on big servers (HAPI FHIR's lists every
            # search parameter of every type: 1.5 MB, seconds on a busy server): a short
            # --timeout meant for searches does not apply
            read = max(self.transport.timeouts.read, METADATA_READ_TIMEOUT)
            response = self.transport.request("GET", "metadata", read_timeout=read)
            body = self._json(response, "metadata")
            if body.get("resourceType") != "CapabilityStatement":
                raise DataError("metadata", "the server did not return a CapabilityStatement")
            self._capabilities = Capabilities(body)
        return self._capabilities

    @property
    def fhir_version(self) -> str:
        """The server's release: ``R4``, ``R4B``, ``R5`` or ``unknown``."""
        return self.capabilities().release

    def supports_search_param(self, rtype: str, name: str) -> bool:
        return self.capabilities().supports_search_param(rtype, name)

    def supports_operation(self, rtype: str | None, name: str) -> bool:
        return self.capabilities().supports_operation(rtype, name)

    # ----------------------------------------------------------------- reads

    def read(self, rtype: str, rid: str) -> dict[str, Any]:
        """``GET [type]/[id]``; 404 raises ResourceNotFound, 410 ResourceGone."""
        return self._json(self.transport.request("GET", self._path(rtype, rid)), f"{rtype}/{rid}")

    def vread(self, rtype: str, rid: str, version: str) -> dict[str, Any]:
        """``GET [type]/[id]/_history/[vid]``."""
        _check_id(version)
        path = f"{self._path(rtype, rid)}/_history/{version}"
        return self._json(self.transport.request("GET", path), path)

    def search(self, rtype: str, params: Params | None = None) -> dict[str, Any]:
        """First page of a search as a Bundle (GET, or POST ``_search`` for long queries)."""
        return self._first_page(self._check_type(rtype), encode_params(params))

    def iter_pages(
        self, rtype: str, params: Params | None = None, *, max_pages: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield each page (a searchset Bundle), following ``next`` links to the end."""
        yield from self._pages(
            lambda: self._first_page(self._check_type(rtype), encode_params(params)), max_pages
        )

    def iter_resources(
        self, rtype: str, params: Params | None = None, *, included: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Yield the matching resources of every page (``included=True`` adds _include ones)."""
        for page in self.iter_pages(rtype, params):
            for entry in page.get("entry") or []:
                mode = (entry.get("search") or {}).get("mode", "match")
                resource = entry.get("resource")
                if resource is None:
                    continue
                if mode == "match" or (included and mode == "include"):
                    yield resource

    def search_all(
        self, rtype: str, params: Params | None = None, *, max_pages: int | None = None
    ) -> SearchResult:
        """Every page of a search, matches and included resources kept apart."""
        return self._collect(
            self._pages(
                lambda: self._first_page(self._check_type(rtype), encode_params(params)), max_pages
            )
        )

    def everything(
        self,
        patient_id: str,
        *,
        types: Sequence[str] | None = None,
        since: str | None = None,
        count: int | None = None,
    ) -> SearchResult:
        """``Patient/[id]/$everything`` (``_type``, ``_since``) when the server offers it,
        else the Patient plus one ``patient=`` search per type (falling back also when the
        server answers the operation with 400/404/405/501)."""
        _check_id(patient_id)
        if self.supports_operation("Patient", "everything"):
            params: list[tuple[str, str]] = []
            if types:
                params.append(("_type", ",".join(types)))
            if since:
                params.append(("_since", since))
            if count:
                params.append(("_count", str(count)))
            path = f"Patient/{patient_id}/$everything"
            try:
                result = self._collect(self._pages(lambda: self._get_bundle(path, params), None))
            except FatalNetworkError as exc:
                # An unsupported operation answers 400/404/405/501. A missing patient also
                # answers 404; the fallback's Patient read then raises ResourceNotFound itself.
                if exc.status not in (400, 404, 405, 501):
                    raise
            else:
                return result
        return self._everything_fallback(patient_id, types, since, count)

    def _everything_fallback(
        self, patient_id: str, types: Sequence[str] | None, since: str | None, count: int | None
    ) -> SearchResult:
        result = SearchResult()
        result.matches.append(self.read("Patient", patient_id))
        caps = self.capabilities()
        wanted = types or [t for t in DEFAULT_EVERYTHING_TYPES if caps.supports_type(t)]
        for rtype in wanted:
            if rtype == "Patient":
                continue
            if not caps.supports_search_param(rtype, "patient"):
                continue
            params: list[tuple[str, str]] = [("patient", patient_id)]
            if since:
                params.append(("_lastUpdated", f"ge{since}"))
            if count:
                params.append(("_count", str(count)))
            part = self.search_all(rtype, params)
            result.matches.extend(part.matches)
            result.included.extend(part.included)
            result.pages += part.pages
        return result

    # ----------------------------------------------------------------- writes

    def create(
        self, resource: Mapping[str, Any], *, if_none_exist: Params | None = None
    ) -> EntryOutcome:
        """``POST [type]``; with ``if_none_exist`` a conditional create (safe to retry)."""
        rtype = self._check_type(str(resource.get("resourceType", "")))
        headers = {"Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = urlencode(encode_params(if_none_exist), safe=",|:/$")
        response = self.transport.request("POST", rtype, json_body=resource, headers=headers)
        return _outcome(response)

    def update(self, resource: Mapping[str, Any], *, if_match: str | None = None) -> EntryOutcome:
        """``PUT [type]/[id]``; ``if_match`` (a version id) makes a conflict raise
        PreconditionFailed instead of overwriting someone else's change."""
        rtype = str(resource.get("resourceType", ""))
        path = self._path(rtype, str(resource.get("id", "")))
        headers = {"Prefer": "return=representation"}
        if if_match is not None:
            headers["If-Match"] = if_match if if_match.startswith("W/") else f'W/"{if_match}"'
        try:
            response = self.transport.request("PUT", path, json_body=resource, headers=headers)
        except FatalNetworkError as exc:
            # the spec says 412; HAPI FHIR answers a stale If-Match with 409 Conflict
            if (
                if_match is not None
                and exc.status == 409
                and not isinstance(exc, PreconditionFailed)
            ):
                raise PreconditionFailed(
                    "HTTP 409 (version conflict on If-Match)",
                    method=exc.method,
                    url=exc.url,
                    status=409,
                    outcome=exc.outcome,
                ) from exc
            raise
        return _outcome(response)

    def conditional_update(self, resource: Mapping[str, Any], criteria: Params) -> EntryOutcome:
        """``PUT [type]?criteria``: update the one match, create when none, 412 when several."""
        rtype = self._check_type(str(resource.get("resourceType", "")))
        query = encode_params(criteria)
        if not query:
            raise ConfigurationError("conditional update needs search criteria")
        response = self.transport.request(
            "PUT",
            rtype,
            params=query,
            json_body=resource,
            headers={"Prefer": "return=representation"},
        )
        return _outcome(response)

    def delete(self, rtype: str, rid: str) -> EntryOutcome:
        """``DELETE [type]/[id]`` (deleting an absent resource is not an error in FHIR)."""
        response = self.transport.request("DELETE", self._path(rtype, rid))
        return _outcome(response)

    def transaction(self, bundle: Mapping[str, Any]) -> list[EntryOutcome]:
        """POST a ``transaction`` Bundle; all-or-nothing on the server. Retried after a lost
        response only when :func:`bundle_is_retry_safe` holds."""
        return self._post_bundle(bundle, "transaction")

    def batch(self, bundle: Mapping[str, Any]) -> list[EntryOutcome]:
        """POST a ``batch`` Bundle; each entry succeeds or fails on its own."""
        return self._post_bundle(bundle, "batch")

    def _post_bundle(self, bundle: Mapping[str, Any], kind: str) -> list[EntryOutcome]:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != kind:
            raise ConfigurationError(f"expected a Bundle of type {kind}")
        response = self.transport.request(
            "POST",
            "",
            json_body=bundle,
            headers={"Prefer": "return=representation"},
            idempotent=bundle_is_retry_safe(bundle),
        )
        body = self._json(response, kind)
        outcomes = []
        for entry in body.get("entry") or []:
            resp = entry.get("response") or {}
            status_text = str(resp.get("status", "0")).strip()
            m = re.match(r"^(\d{3})", status_text)
            oo = resp.get("outcome")
            outcomes.append(
                EntryOutcome(
                    status=int(m.group(1)) if m else 0,
                    location=resp.get("location"),
                    etag=resp.get("etag"),
                    last_modified=resp.get("lastModified"),
                    resource=entry.get("resource"),
                    outcome=_oo_text(oo) if isinstance(oo, dict) else None,
                )
            )
        return outcomes

    # ----------------------------------------------------------------- internals

    def _first_page(self, rtype: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        if self.config.page_size and not any(k == "_count" for k, _ in params):
            params = [*params, ("_count", str(self.config.page_size))]
        query = urlencode(params, safe=",|:/$")
        if len(query) > self.config.max_get_query:
            response = self.transport.request(
                "POST",
                f"{rtype}/_search",
                form=params,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            return self._json(response, f"{rtype}/_search")
        return self._get_bundle(rtype, params)

    def _get_bundle(self, path: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        response = self.transport.request("GET", path, params=params)
        body = self._json(response, path)
        if body.get("resourceType") != "Bundle":
            raise DataError(path, "search answer is not a Bundle")
        return body

    def _pages(
        self, first: Callable[[], dict[str, Any]], max_pages: int | None
    ) -> Iterator[dict[str, Any]]:
        page = first()
        seen: set[str] = set()
        count = 0
        while True:
            count += 1
            yield page
            if max_pages is not None and count >= max_pages:
                return
            nxt = _next_link(page)
            if not nxt:
                return
            url = urljoin(self.base_url + "/", nxt)
            if not same_origin(url, self.base_url):
                raise FatalNetworkError(
                    "refusing a next link to another scheme, host or port",
                    method="GET",
                    url=redact_url(url),
                )
            if url in seen:
                raise FatalNetworkError(
                    "paging loop: the server returned the same next link twice",
                    method="GET",
                    url=redact_url(url),
                )
            seen.add(url)
            response = self.transport.request("GET", url)
            page = self._json(response, "next page")
            if page.get("resourceType") != "Bundle":
                raise DataError("next page", "search answer is not a Bundle")

    @staticmethod
    def _collect(pages: Iterable[dict[str, Any]]) -> SearchResult:
        result = SearchResult()
        for page in pages:
            result.pages += 1
            if result.total is None and isinstance(page.get("total"), int):
                result.total = page["total"]
            for entry in page.get("entry") or []:
                resource = entry.get("resource")
                if resource is None:
                    continue
                mode = (entry.get("search") or {}).get("mode", "match")
                if mode == "match":
                    result.matches.append(resource)
                elif mode == "include":
                    result.included.append(resource)
        return result

    def _check_type(self, rtype: str) -> str:
        if not _TYPE_RE.match(rtype):
            raise ConfigurationError(f"not a FHIR resource type: {rtype!r}")
        return rtype

    def _path(self, rtype: str, rid: str) -> str:
        self._check_type(rtype)
        _check_id(rid)
        return f"{rtype}/{rid}"

    @staticmethod
    def _json(response: requests.Response, where: str) -> dict[str, Any]:
        try:
            body, mended = json_body(response)
        except ValueError:
            raise DataError(where, "server answer is not JSON") from None
        if not isinstance(body, dict):
            raise DataError(where, "server answer is not a JSON object")
        if mended:
            log.warning(
                "%s: %d string(s) of the server's answer hold %s; each such character "
                "is read as U+FFFD",
                where,
                mended,
                LONE_SURROGATE,
            )
        return body


def _check_id(rid: str) -> None:
    if not _ID_RE.match(rid):
        raise ConfigurationError(f"not a FHIR id: {rid[:70]!r}")


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _oo_text(oo: Mapping[str, Any]) -> str | None:
    texts = []
    for issue in oo.get("issue") or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
        if text:
            texts.append(str(text))
    return "; ".join(texts) or None


def _outcome(response: requests.Response) -> EntryOutcome:
    resource: dict[str, Any] | None = None
    if response.content:
        try:
            body, _mended = json_body(response)
        except ValueError:
            body = None
        if isinstance(body, dict):
            resource = body
    oo = None
    if resource is not None and resource.get("resourceType") == "OperationOutcome":
        oo = _oo_text(resource)
    return EntryOutcome(
        status=response.status_code,
        location=response.headers.get("Location") or response.headers.get("Content-Location"),
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
        resource=resource,
        outcome=oo,
    )
