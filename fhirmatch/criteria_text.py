"""Split an eligibility section into criteria: inclusion and exclusion bullets, nested bullets.

Used by :mod:`fhirmatch.drafting`. The input is the free text of a ClinicalTrials.gov record's
``eligibilityCriteria`` (Markdown-like: ``Inclusion Criteria:`` headings, ``*`` bullets indented
for nesting) or text copied from a registry web page (``-``, ``•``, ``‣``, ``1.`` bullets; inline
``a. … b. …`` items). Every bullet keeps its wording verbatim: :attr:`Bullet.text` is a slice of
the input with line breaks of continued lines kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Bullet", "Section", "split_criteria"]

Section = Literal["inclusion", "exclusion"]

_HEADING = re.compile(
    r"^\s*(?:[#*_]+\s*)?(?:key\s+|main\s+|general\s+)?(?P<kind>inclusion|exclusion)"
    r"(?:\s+criteria)?\s*[:：]?\s*(?:[*_]+)?\s*$",
    re.IGNORECASE,
)
#: headings of page sections after the criteria (text copied from a registry page)
_END = re.compile(
    r"^\s*(?:sites?\s*/\s*locations?|locations?|arms? of the study|study design|outcome measures?"
    r"|contacts?|sponsors?|references?|more information|collaborators?|investigators?)\s*:?\s*$",
    re.IGNORECASE,
)
_BULLET = re.compile(
    r"^(?P<indent>[ \t]*)(?:(?P<glyph>[-*•‣∙⁃◦▪●·–—])[ \t]*(?=\S)"
    r"|(?P<num>\d{1,2}[.)]|\(\d{1,2}\))[ \t]+|(?P<letter>[a-z][.)]|\([a-z]\))[ \t]+)"
)
_INLINE_ITEM = re.compile(r"(?:(?<=\s)|^)(?P<mark>[a-h])[.)]\s+")


@dataclass
class Bullet:
    """One criterion of the text: its wording, where it is, and its sub-bullets."""

    text: str
    kind: Section
    start: int
    end: int
    glyph: str = ""
    indent: int = 0
    children: list[Bullet] = field(default_factory=list)


def _marker(match: re.Match[str]) -> str:
    if match.group("glyph"):
        return match.group("glyph")
    if match.group("num"):
        return "1."
    return "a."


def _inline_items(bullet: Bullet, source: str) -> None:
    """``a. … b. … c. …`` inside one bullet become its children (letters in order from a)."""
    text = bullet.text
    marks = list(_INLINE_ITEM.finditer(text))
    chosen: list[re.Match[str]] = []
    for m in marks:
        if m.group("mark") == "abcdefgh"[len(chosen)]:
            chosen.append(m)
    if len(chosen) < 2:
        return
    for i, m in enumerate(chosen):
        end = chosen[i + 1].start() if i + 1 < len(chosen) else len(text)
        piece = text[m.end() : end]
        stripped = piece.rstrip().rstrip(";,").rstrip()
        start = bullet.start + m.end()
        bullet.children.append(
            Bullet(stripped, bullet.kind, start, start + len(stripped), glyph="a.")
        )
    assert all(source[c.start : c.end] == c.text for c in bullet.children)


def split_criteria(text: str, default: Section = "inclusion") -> list[Bullet]:
    """The criteria of ``text`` as a list of top-level bullets (with nested children).

    Text before any ``Inclusion``/``Exclusion`` heading counts as ``default``; headings switch the
    kind; a heading of a later page section ("Sites / Locations") ends the criteria. A paragraph
    without a bullet glyph is a criterion of its own; a line continuing a bullet without a blank
    line belongs to that bullet.
    """
    kind: Section = default
    seen_heading: bool
    # with headings, what comes before the first one is not criteria (title, summary)
    lines = text.splitlines()
    seen_heading = not any(_HEADING.match(line) for line in lines)
    # without headings, paragraphs before the first bullet are not criteria either
    preamble = seen_heading and any(_BULLET.match(line) for line in lines)
    top: list[Bullet] = []
    stack: list[Bullet] = []  # the open bullets, outermost first
    last: Bullet | None = None
    blank_before = True
    offset = 0
    for raw in text.splitlines(keepends=True):
        line = raw.rstrip("\r\n")
        line_start = offset
        offset += len(raw)
        if not line.strip():
            blank_before = True
            continue
        heading = _HEADING.match(line)
        if heading:
            kind = "inclusion" if heading.group("kind").lower() == "inclusion" else "exclusion"
            seen_heading = True
            stack, last, blank_before = [], None, True
            continue
        if _END.match(line):
            break
        if not seen_heading or (preamble and not _BULLET.match(line)):
            continue
        preamble = False
        bullet_match = _BULLET.match(line)
        if bullet_match is None and last is not None and not blank_before:
            # continuation of the previous bullet
            last.text = text[last.start : line_start + len(line.rstrip())]
            last.end = line_start + len(line.rstrip())
            continue
        blank_before = False
        if bullet_match is not None:
            glyph = _marker(bullet_match)
            indent = len(bullet_match.group("indent").expandtabs(4))
            body_start = line_start + bullet_match.end()
        else:
            glyph, indent = "", len(line) - len(line.lstrip())
            body_start = line_start + indent
        body_end = line_start + len(line.rstrip())
        if body_end <= body_start:
            continue
        bullet = Bullet(
            text[body_start:body_end], kind, body_start, body_end, glyph=glyph, indent=indent
        )
        parent = _parent(stack, bullet)
        if parent is None:
            top.append(bullet)
            stack = [bullet]
        else:
            parent.children.append(bullet)
            stack = [*stack[: stack.index(parent) + 1], bullet]
        last = bullet
    for bullet in top:
        _finish(bullet, text)
    return top


def _parent(stack: list[Bullet], bullet: Bullet) -> Bullet | None:
    """The open bullet ``bullet`` nests in: a deeper indent, or a different glyph after a bullet
    ending with a colon (or inside the list that such a bullet opened)."""
    for candidate in reversed(stack):
        if bullet.indent > candidate.indent and bullet.glyph:
            return candidate
        if bullet.indent < candidate.indent:
            continue
        opens = candidate.text.rstrip().endswith(":")
        if opens and bullet.glyph and bullet.glyph != candidate.glyph:
            return candidate
        if candidate.glyph == bullet.glyph:
            # a sibling of ``candidate``: its parent is the one before it
            idx = stack.index(candidate)
            return stack[idx - 1] if idx > 0 else None
    return None


def _finish(bullet: Bullet, source: str) -> None:
    if bullet.children:
        for child in bullet.children:
            _finish(child, source)
    else:
        _inline_items(bullet, source)
