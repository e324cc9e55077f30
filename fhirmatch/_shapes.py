"""The shapes NDJSON lines are partly decoded into (:mod:`msgspec` structs), used by
:mod:`fhirmatch.records`.

They live in a module of their own because msgspec reads a struct's field types from its
annotations: a module compiled with mypyc (see ``setup.py``) keeps them in a form msgspec cannot
read, so this module is never compiled.

Each is made with ``gc=False``: it holds only what JSON decodes to, which can form no reference
cycle, so the garbage collector need not track the one or two made per line.
"""

from __future__ import annotations

from typing import Any

import msgspec


class _Head(msgspec.Struct, gc=False):
    """The top-level elements that say whose a resource is, and its code."""

    resourceType: Any = None
    id: Any = None
    code: Any = None
    #: an Observation's components, left undecoded (:meth:`ResourceFilter.keeps` reads them)
    component: msgspec.Raw = msgspec.Raw(b"")
    subject: Any = None
    patient: Any = None
    beneficiary: Any = None
    individual: Any = None


class _Coding(msgspec.Struct, gc=False):
    system: Any = None
    code: Any = None


class _Concept(msgspec.Struct, gc=False):
    coding: list[_Coding] | None = None


class _Reference(msgspec.Struct, gc=False):
    reference: str | None = None


class _Part(msgspec.Struct, gc=False):
    """One component of an Observation (a panel's part), read only as far as its code, which is
    left undecoded."""

    code: msgspec.Raw = msgspec.Raw(b"")


class _Brief(msgspec.Struct, gc=False):
    """What most lines of a Bulk export need read to be routed or dropped: the type, the code
    and the subject (typed, so decoding fails on any other shape, and the line is read by
    :func:`decode_head` instead). The code is left undecoded: most lines of an export repeat a
    few codes, and :meth:`ResourceFilter.keeps_brief` judges each once."""

    resourceType: str | None = None
    code: msgspec.Raw = msgspec.Raw(b"")
    component: msgspec.Raw = msgspec.Raw(b"")
    subject: _Reference | None = None
    #: an Observation's status and its first date, as written (:meth:`ResourceFilter.outdated`)
    status: msgspec.Raw = msgspec.Raw(b"")
    effectiveDateTime: msgspec.Raw = msgspec.Raw(b"")


class _Dated(msgspec.Struct, gc=False):
    """What, besides its code, the screening engine reads of a resource dated outside every
    window that asks for its code: the statuses that make it usable or in scope, and its dates
    (each left as written). See :meth:`ResourceFilter.outdated`."""

    status: msgspec.Raw = msgspec.Raw(b"")
    clinicalStatus: msgspec.Raw = msgspec.Raw(b"")
    verificationStatus: msgspec.Raw = msgspec.Raw(b"")
    effectiveDateTime: msgspec.Raw = msgspec.Raw(b"")
    effectiveInstant: msgspec.Raw = msgspec.Raw(b"")
    effectivePeriod: msgspec.Raw = msgspec.Raw(b"")
    issued: msgspec.Raw = msgspec.Raw(b"")
    onsetDateTime: msgspec.Raw = msgspec.Raw(b"")
    onsetPeriod: msgspec.Raw = msgspec.Raw(b"")
    recordedDate: msgspec.Raw = msgspec.Raw(b"")
    performedDateTime: msgspec.Raw = msgspec.Raw(b"")
    performedPeriod: msgspec.Raw = msgspec.Raw(b"")
    date: msgspec.Raw = msgspec.Raw(b"")
