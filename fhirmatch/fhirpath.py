"""A small FHIRPath compiler for the subset trial conditions use, with fhirpathpy's semantics.

Usage::

    condition = compile_expression("%ecog.valueQuantity.value <= 2")
    condition(patient, {"ecog": [observation]})   # -> [True], [False] or []

:func:`compile_expression` parses the expression with fhirpathpy's own parser and turns the
syntax tree into nested Python closures over plain JSON values (dicts, lists, str, int, float).
An expression using anything outside the subset below is compiled by ``fhirpathpy.compile``
instead (once), so every valid expression works; :attr:`CompiledExpression.native` says which
path was taken, and ``native=False`` forces fhirpathpy (for baselines and differential tests).

The subset (everything the seed trials use):

* ``%variables``; member navigation (``valueQuantity.value``; primitive extensions ``_value``
  are navigated too, as fhirpathpy does);
* literals: strings, numbers (integers stay ``int``, others are ``Decimal``), ``true``/``false``,
  ``{}``; unions of literals (``('a' | 'b')``);
* ``exists()``, ``exists(criteria)``, ``empty()``, ``not()``, ``count()``, ``where(criteria)``,
  ``iif(criterion, then[, else])``, ``startsWith('literal')``, ``memberOf('ValueSet URL')``;
* ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``, ``*``, ``+`` (numbers, strings), ``and``,
  ``or``, ``xor``, ``implies``.

Semantics are fhirpathpy's (2.x), not an idealised reading of the specification, so switching
evaluator never changes an outcome. The quirks reproduced on purpose include: both operands of
``and``/``or`` are always evaluated and must be Boolean singletons (otherwise an error);
comparisons convert navigated decimals to ``Decimal(str(value))`` and refuse to compare values of
different kinds; ``=`` compares the first items of equally long collections; ``in`` needs a
singleton on its left; ``not()`` of a non-Boolean singleton is ``false``; results are returned as
fhirpathpy returns them (decimals as ``Decimal``, extension-only elements dropped). fhirpathpy
wraps navigated values in nodes and keeps variable values bare, and a few rules differ between
the two (``where`` on a ``None`` item, the duplicate-extension rule of comparisons); each
compiled step therefore knows statically whether its items are navigated.

``memberOf(url)`` is FHIR's terminology function: on a single Coding or CodeableConcept (any of
its codings) it says whether the code is in the ValueSet, resolved through the
:class:`~fhirmatch.terminology.Terminology` given to :func:`compile_expression`; on a single code
string, or a Coding without a system, whether it is a code of the ValueSet when the ValueSet
draws on one code system (else empty); on an empty or longer collection it is empty. The same
function is given to fhirpathpy (its ``userInvocationTable``), so both evaluators agree. The URL
must be a string literal.

Errors raised while evaluating are ordinary exceptions (``ValueError``, ``TypeError``,
``decimal`` errors), as with fhirpathpy; callers treat any exception as "could not evaluate".
"""

from __future__ import annotations

import contextvars
import copy
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .terminology import Terminology

__all__ = [
    "CompiledExpression",
    "ParsedExpression",
    "compile_expression",
    "member_of",
    "parse_expression",
    "reads_context",
]

UCUM = "http://unitsofmeasure.org"

#: A compiled step: (focus collection, variables) -> result collection.
Step = Callable[[list[Any], Mapping[str, Any]], list[Any]]


class _Unsupported(Exception):
    """An expression (or part of one) outside the compiled subset; fhirpathpy evaluates it.

    Internal: never leaves this module (the expression falls back to fhirpathpy instead).
    """


@dataclass(frozen=True)
class _Code:
    """One compiled sub-expression.

    ``navigated``: its items are navigated values (fhirpathpy wraps them in nodes), as opposed to
    bare values (variables, literals, results of operators and functions).
    ``boolean``: it only ever yields ``[]``, ``[True]`` or ``[False]``.
    ``const``: its value when it is a literal (it depends on neither focus nor variables).
    ``focus``: it is the focus itself, whose kind depends on where the expression is used.
    """

    step: Step
    navigated: bool = False
    boolean: bool = False
    const: list[Any] | None = None
    focus: bool = False


def _literal(value: list[Any], *, boolean: bool = False) -> _Code:
    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        return list(value)

    return _Code(step, boolean=boolean, const=value)


def _data(value: Any) -> Any:
    """fhirpathpy's ``get_data`` for a bare value: floats become ``Decimal(str(value))``."""
    return Decimal(str(value)) if isinstance(value, float) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | Decimal | complex) and not isinstance(value, bool)


def _arraify(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    return [] if value is None else [value]


# --------------------------------------------------------------------------- terminology

#: the terminology ``memberOf`` resolves ValueSets with, while an expression is being compiled
_TERMINOLOGY: contextvars.ContextVar[Terminology | None] = contextvars.ContextVar(
    "fhirmatch_fhirpath_terminology", default=None
)


def member_of(terminology: Terminology | None, url: str, items: list[Any]) -> list[Any]:
    """FHIR's ``memberOf(url)`` on a collection of plain JSON values (see the module doc).

    Raises ``ValueError`` when there is no terminology or it does not know the ValueSet (a
    condition error: the criterion becomes unknown, and ``trials check`` reports it earlier).
    """
    if terminology is None:
        raise ValueError("memberOf(): no terminology to resolve ValueSets with")
    if url not in terminology:
        raise ValueError(f"memberOf(): unknown ValueSet {url}")
    if len(items) != 1:
        return []
    item = items[0]
    if isinstance(item, dict) or isinstance(item, Mapping):
        if isinstance(item.get("coding"), list):
            answers = [_coding_member(terminology, url, c) for c in item["coding"]]
            if True in answers:
                return [True]
            return [] if None in answers and not any(a is False for a in answers) else [False]
        answer = _coding_member(terminology, url, item)
        return [] if answer is None else [answer]
    if isinstance(item, str):
        return _bare_code(terminology, url, item)
    return []


def _bare_code(terminology: Terminology, url: str, code: str) -> list[Any]:
    """A code without its system: a member when the ValueSet draws on one code system only."""
    systems = {system for system, _code in terminology.expand(url)}
    if len(systems) != 1:
        return []
    return [terminology.contains(url, systems.pop(), code)]


def _coding_member(terminology: Terminology, url: str, coding: Any) -> bool | None:
    if not (isinstance(coding, dict) or isinstance(coding, Mapping)):
        return None
    if not isinstance(coding.get("code"), str):
        return None
    system = coding.get("system")
    if isinstance(system, str) and system:
        return terminology.contains(url, system, coding["code"])
    found = _bare_code(terminology, url, coding["code"])
    return found[0] if found else None


# --------------------------------------------------------------------------- the compiler


def _children(node: dict[str, Any]) -> list[dict[str, Any]]:
    return list(node.get("children") or [])


def _identifier(node: dict[str, Any]) -> str:
    if node.get("type") != "Identifier":
        raise _Unsupported(f"{node.get('type')} where an identifier was expected")
    text = str(node.get("text", ""))
    if not text or any(q in text for q in "`\"'"):
        raise _Unsupported(f"quoted identifier {text!r}")
    return text


def _compile(node: dict[str, Any]) -> _Code:
    kind = node.get("type")
    kids = _children(node)
    if kind in ("TermExpression", "InvocationTerm", "ParenthesizedTerm") and len(kids) == 1:
        return _compile(kids[0])
    if kind == "LiteralTerm" and len(kids) == 1:
        return _compile_literal(kids[0])
    if kind == "ExternalConstantTerm" and len(kids) == 1:
        return _compile_variable(kids[0])
    if kind == "InvocationExpression" and len(kids) == 2:
        return _compile_invocation(_compile(kids[0]), kids[1])
    if kind == "MemberInvocation" and len(kids) == 1:
        return _compile_member(_code_from_focus(), _identifier(kids[0]))
    if kind == "FunctionInvocation" and len(kids) == 1:
        return _compile_function(_code_from_focus(), kids[0])
    if len(kids) == 2 and kind in _BINARY_KINDS:
        op = (node.get("terminalNodeText") or [None])[0]
        return _compile_binary(str(op), _compile(kids[0]), _compile(kids[1]))
    raise _Unsupported(f"{kind} is not in the compiled subset")


_BINARY_KINDS = frozenset(
    {
        "OrExpression",
        "AndExpression",
        "XorExpression",
        "ImpliesExpression",
        "EqualityExpression",
        "InequalityExpression",
        "MultiplicativeExpression",
        "AdditiveExpression",
        "MembershipExpression",
        "UnionExpression",
    }
)


def _code_from_focus() -> _Code:
    """The focus itself (the start of a path such as ``code.coding`` inside ``where``)."""

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        return focus

    return _Code(step, focus=True)


def _compile_literal(node: dict[str, Any]) -> _Code:
    kind = node.get("type")
    text = node.get("text")
    if not isinstance(text, str):
        raise _Unsupported("a literal without its text")
    if kind == "StringLiteral":
        if len(text) >= 2 and text[0] == text[-1] == "'" and "\\" not in text[1:-1]:
            return _literal([text[1:-1]])  # no escapes: the text between the quotes
        # fhirpathpy is imported only when needed (start-up): here, for its reading of escapes
        from fhirpathpy.engine.evaluators import string_literal

        return _literal(string_literal(None, None, node))
    if kind == "NumberLiteral":
        # an integer when the number is whole (``2``, ``2.0``), else a decimal
        number = Decimal(text)
        whole = int(number)
        return _literal([whole] if number == whole else [number])
    if kind == "BooleanLiteral":
        return _literal([text == "true"], boolean=True)
    if kind == "NullLiteral":
        return _literal([], boolean=True)
    raise _Unsupported(f"{kind} literals are not in the compiled subset")


def _compile_variable(node: dict[str, Any]) -> _Code:
    kids = _children(node)
    if node.get("type") != "ExternalConstant" or len(kids) != 1:
        raise _Unsupported("unexpected external constant")
    name = _identifier(kids[0])

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        try:
            value = env[name]
        except KeyError:
            raise ValueError(
                f"Attempting to access an undefined environment variable: {name}"
            ) from None
        return _arraify(value)

    return _Code(step)


def _compile_invocation(target: _Code, node: dict[str, Any]) -> _Code:
    kind = node.get("type")
    kids = _children(node)
    if kind == "MemberInvocation" and len(kids) == 1:
        return _compile_member(target, _identifier(kids[0]))
    if kind == "FunctionInvocation" and len(kids) == 1:
        return _compile_function(target, kids[0])
    raise _Unsupported(f"{kind} is not in the compiled subset")


def _compile_member(target: _Code, key: str) -> _Code:
    if key[0] == key[0].upper() or key == "length":
        # type names filter by resourceType; ``length`` is a string property in fhirpathpy
        raise _Unsupported(f"member {key!r} is not in the compiled subset")
    ext = "_" + key
    inner = target.step

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        out: list[Any] = []
        for item in inner(focus, env):
            # decoded JSON is dicts: the exact check first, the ABC's slower one for the rest
            if isinstance(item, dict) or isinstance(item, Mapping):
                value = item.get(key)
                if value is not None:
                    if isinstance(value, list):
                        out.extend(value)
                    else:
                        out.append(value)
                value = item.get(ext)
                if value is not None:
                    if isinstance(value, list):
                        out.extend(value)
                    else:
                        out.append(value)
        return out

    return _Code(step, navigated=True)


def _params(node: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    kids = _children(node)
    if node.get("type") != "Functn" or not kids:
        raise _Unsupported("unexpected function node")
    name = _identifier(kids[0])
    params: list[dict[str, Any]] = []
    if len(kids) > 1:
        if kids[1].get("type") != "ParamList":
            raise _Unsupported("unexpected parameter list")
        params = _children(kids[1])
    return name, params


def _compile_function(target: _Code, node: dict[str, Any]) -> _Code:
    name, params = _params(node)
    compiled = [_compile(p) for p in params]
    inner = target.step
    if name in ("exists", "empty", "count", "not") and not compiled:
        return _Code(_NO_ARG[name](inner), boolean=name != "count")
    if name == "exists" and len(compiled) == 1:
        where = _where(target, compiled[0])
        return _Code(_NO_ARG["exists"](where.step), boolean=True)
    if name == "where" and len(compiled) == 1:
        return _where(target, compiled[0])
    if name == "iif" and len(compiled) in (2, 3):
        return _iif(target, *compiled)
    if name == "startsWith" and len(compiled) == 1:
        return _starts_with(target, compiled[0])
    if name == "memberOf" and len(compiled) == 1:
        return _member_of(target, compiled[0])
    raise _Unsupported(f"{name}() with {len(compiled)} parameters")


def _exists(inner: Step) -> Step:
    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        return [bool(inner(focus, env))]

    return step


def _empty(inner: Step) -> Step:
    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        return [not inner(focus, env)]

    return step


def _count(inner: Step) -> Step:
    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        return [len(inner(focus, env))]

    return step


def _not(inner: Step) -> Step:
    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        value = inner(focus, env)
        if len(value) != 1:
            return []
        data = value[0]
        return [not data] if isinstance(data, bool) else [False]

    return step


_NO_ARG: dict[str, Callable[[Step], Step]] = {
    "exists": _exists,
    "empty": _empty,
    "count": _count,
    "not": _not,
}


def _where(target: _Code, criteria: _Code) -> _Code:
    if target.focus:
        raise _Unsupported("where() on the focus itself")
    if not criteria.boolean:
        # fhirpathpy keeps an item when the first value is truthy, and its nodes are always
        # truthy: only Boolean criteria give the same answer on bare values
        raise _Unsupported("where() with a criterion that is not Boolean")
    inner, test, navigated = target.step, criteria.step, target.navigated

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        out: list[Any] = []
        for item in inner(focus, env):
            this = [item] if navigated else _arraify(item)
            result = test(this, env)
            if result and result[0]:
                if isinstance(item, list) and not navigated:
                    out.extend(item)
                else:
                    out.append(item)
        return out

    return _Code(step, navigated=navigated)


def _iif(target: _Code, cond: _Code, then: _Code, other: _Code | None = None) -> _Code:
    branches = [then] if other is None else [then, other]
    kinds = {b.navigated for b in branches if b.const != []}
    if len(kinds) > 1:
        raise _Unsupported("iif() branches of different kinds")
    inner, test, yes = target.step, cond.step, then.step
    no = other.step if other is not None else None

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        data = inner(focus, env)
        result = test(data, env)
        if len(result) == 1 and result[0] == True:  # noqa: E712 (fhirpathpy's is_true)
            return yes(data, env)
        return no(data, env) if no is not None else []

    return _Code(
        step,
        navigated=kinds.pop() if kinds else False,
        boolean=all(b.boolean for b in branches),
    )


def _starts_with(target: _Code, prefix: _Code) -> _Code:
    if prefix.const is None or len(prefix.const) != 1 or not isinstance(prefix.const[0], str):
        raise _Unsupported("startsWith() needs one string literal")
    text: str = prefix.const[0]
    inner = target.step

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        value = inner(focus, env)
        if not value:
            return []
        if len(value) != 1 or not isinstance(_data(value[0]), str):
            raise ValueError("startsWith(): expected one string")
        string = value[0]
        return [bool(string) and string.startswith(text)]

    return _Code(step, boolean=True)


def _member_of(target: _Code, url: _Code) -> _Code:
    if url.const is None or len(url.const) != 1 or not isinstance(url.const[0], str):
        raise _Unsupported("memberOf() needs one string literal")
    value_set: str = url.const[0]
    terminology = _TERMINOLOGY.get()
    inner = target.step

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        return member_of(terminology, value_set, inner(focus, env))

    return _Code(step, boolean=True)


# --------------------------------------------------------------------------- operators


def _boolean_operand(value: list[Any]) -> Any:
    """fhirpathpy's ``[["Boolean"]]`` parameter: ``[]``, or a Boolean singleton (else an error)."""
    if not value:
        return []
    if len(value) > 1:
        raise ValueError("expected a Boolean singleton, got a collection")
    data = value[0]
    if data is True or data is False:
        return data
    raise ValueError("expected a Boolean")


def _or(a: Any, b: Any) -> Any:
    if isinstance(b, list):
        return True if a is True else []
    if isinstance(a, list):
        return True if b is True else []
    return a or b


def _and(a: Any, b: Any) -> Any:
    if isinstance(b, list):
        return False if a is False else []
    if isinstance(a, list):
        return [] if b is True else False
    return a and b


def _xor(a: Any, b: Any) -> Any:
    if isinstance(a, list) or isinstance(b, list):
        return []
    return (a and not b) or (not a and b)


def _implies(a: Any, b: Any) -> Any:
    if isinstance(b, list):
        return True if a is False else []
    if isinstance(a, list):
        return True if b is True else []
    if a is False:
        return True
    return a and b


_LOGIC: dict[str, Callable[[Any, Any], Any]] = {
    "or": _or,
    "and": _and,
    "xor": _xor,
    "implies": _implies,
}


def _comparable(value: list[Any], navigated: bool) -> Any:
    """The singleton a comparison compares (fhirpathpy's ``typecheck`` for one side)."""
    if navigated and len(value) == 2 and "extension" in value[1]:
        value = value[:1]  # a primitive and its extension element count as one value
    if len(value) > 1:
        raise ValueError("comparison: expected a singleton")
    return _data(value[0])


def _ordering(op: str, left: _Code, right: _Code) -> Step:
    compare: Callable[[Any, Any], bool] = {
        "<": lambda a, b: a < b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
    }[op]
    lstep, rstep, lnav, rnav = left.step, right.step, left.navigated, right.navigated

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        a, b = lstep(focus, env), rstep(focus, env)
        if not a or not b:
            return []
        if (not lnav and a[0] is None) or (not rnav and b[0] is None):
            return []
        x, y = _comparable(a, lnav), _comparable(b, rnav)
        if x.__class__ is not y.__class__ and not (_is_number(x) and _is_number(y)):
            raise TypeError(f"cannot compare {x.__class__.__name__} with {y.__class__.__name__}")
        return [compare(x, y)]

    return step


def _equality(op: str, left: _Code, right: _Code) -> Step:
    lstep, rstep = left.step, right.step
    negate = op == "!="

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        a, b = lstep(focus, env), rstep(focus, env)
        if not a or not b:
            return []
        same = len(a) == len(b) and a[0] == b[0]
        return [same != negate]

    return step


def _membership(left: _Code, right: _Code) -> Step:
    lstep, rstep = left.step, right.step

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        a, b = lstep(focus, env), rstep(focus, env)
        if not a:
            return []
        if not b:
            return [False]
        if len(a) > 1:
            raise ValueError("in: expected a singleton on the left")
        item = a[0]
        return [any(x == item for x in b)]

    return step


def _number_operand(value: list[Any]) -> Any:
    if len(value) > 1:
        raise ValueError("expected a number, got a collection")
    if not value:
        return None
    data = _data(value[0])
    if not isinstance(data, int | float) and not isinstance(data, numbers.Number):
        raise ValueError("expected a number")
    return data


def _multiply(left: _Code, right: _Code) -> Step:
    lstep, rstep = left.step, right.step

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        x = _number_operand(lstep(focus, env))
        y = _number_operand(rstep(focus, env))
        if x is None or y is None:
            return []
        return _arraify(x * y)

    return step


def _plus(left: _Code, right: _Code) -> Step:
    """fhirpathpy's ``+`` on strings (concatenation) and numbers; empty when a side is empty."""
    lstep, rstep, lnav, rnav = left.step, right.step, left.navigated, right.navigated

    def step(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
        a, b = lstep(focus, env), rstep(focus, env)
        if not a or not b:
            return []
        if lnav and len(a) == 2 and "extension" in a[1]:
            a = a[:1]
        if rnav and len(b) == 2 and "extension" in b[1]:
            b = b[:1]
        if len(a) != 1 or len(b) != 1:
            raise ValueError("+: expected singletons")
        x, y = _data(a[0]), _data(b[0])
        if isinstance(x, str) and isinstance(y, str):
            return [x + y]
        if _is_number(x) and _is_number(y):
            return _arraify(x + y)
        raise TypeError(f"cannot add {x.__class__.__name__} and {y.__class__.__name__}")

    return step


def _compile_binary(op: str, left: _Code, right: _Code) -> _Code:
    if op in _LOGIC:
        combine = _LOGIC[op]
        lstep, rstep = left.step, right.step

        def logic(focus: list[Any], env: Mapping[str, Any]) -> list[Any]:
            a = _boolean_operand(lstep(focus, env))
            b = _boolean_operand(rstep(focus, env))
            return _arraify(combine(a, b))

        return _Code(logic, boolean=True)
    if op in ("<", ">", "<=", ">="):
        return _Code(_ordering(op, left, right), boolean=True)
    if op in ("=", "!="):
        return _Code(_equality(op, left, right), boolean=True)
    if op == "in":
        return _Code(_membership(left, right), boolean=True)
    if op == "*":
        return _Code(_multiply(left, right))
    if op == "+":
        return _Code(_plus(left, right))
    if op == "|" and left.const is not None and right.const is not None:
        from fhirpathpy.engine.invocations.combining import union_op

        return _literal(list(union_op(None, left.const, right.const)))
    raise _Unsupported(f"operator {op!r} is not in the compiled subset")


# --------------------------------------------------------------------------- results


def _output(value: Any) -> Any:
    """fhirpathpy's final conversion of one bare value (decimals, nested extension elements)."""
    if isinstance(value, list):
        out = []
        for item in value:
            converted = _output(item)
            if isinstance(converted, dict) and list(converted) == ["extension"]:
                continue
            out.append(converted)
        return out
    if isinstance(value, dict):
        return {key: _output(item) for key, item in value.items()}
    return _data(value)


def _result(items: list[Any], navigated: bool) -> list[Any]:
    out = []
    for item in items:
        if item is True or item is False:
            out.append(item)
            continue
        if navigated and isinstance(item, list):
            converted: Any = item  # a node holding a list is returned as it is
        else:
            converted = _output(item)
        if isinstance(converted, dict) and list(converted) == ["extension"]:
            continue
        out.append(converted)
    return out


@dataclass(frozen=True)
class ParsedExpression:
    """One FHIRPath expression parsed once: fhirpathpy's syntax tree, or why it has none.

    ``problems`` lists every syntax error (ANTLR's messages with their column), input left over
    after a complete expression, and anything fhirpathpy cannot turn into its tree; ``tree`` is
    None exactly when there are problems.
    """

    expression: str
    tree: dict[str, Any] | None
    problems: tuple[str, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled by its fields (the compiled-trial cache): a frozen dataclass compiled with
        # mypyc cannot be unpickled by setting its attributes
        return (ParsedExpression, (self.expression, self.tree, self.problems))


#: variables that name the resource an expression is evaluated on
_ROOT_VARIABLES = frozenset({"context", "resource", "rootResource"})
#: functions whose arguments are expressions evaluated on each item of their input
_ITEM_FUNCTIONS = frozenset({"where", "select", "exists", "all", "repeat", "iif"})
#: functions that read nothing, not even their input
_NO_INPUT_FUNCTIONS = frozenset({"today", "now", "timeOfDay", "iif"})


def reads_context(tree: dict[str, Any]) -> bool:
    """Whether an expression may read the resource it is evaluated on (the engine's Patient)
    other than through ``%patient``: a path or function that starts from that resource
    (``gender``, ``$this``, ``exists(...)``, the results of ``iif(...)`` at the top), or
    ``%context``, ``%resource``, ``%rootResource``. Paths inside ``where``, ``exists``,
    ``select``, ``all``, ``repeat`` or ``iif`` applied to something else (``%cond.where(code
    ...)``) read that something's items. Conservative: what it cannot tell counts as reading."""
    try:
        return _reads(tree, at_root=True)
    except _Unsupported:  # a node of a shape it does not know
        return True


def _reads(node: dict[str, Any], at_root: bool) -> bool:
    kind = node.get("type")
    kids = _children(node)
    if kind == "ExternalConstant":
        return any(k.get("text") in _ROOT_VARIABLES for k in kids)
    if kind == "InvocationExpression" and len(kids) == 2:
        # a target, then a member or function applied to the target's result
        if _reads(kids[0], at_root):
            return True
        call = kids[1]
        if call.get("type") == "FunctionInvocation":
            name, params = _function_parts(call)
            # an item function's arguments are evaluated on the target's items; any other
            # function's arguments on the current focus
            inner = False if name in _ITEM_FUNCTIONS else at_root
            return any(_reads(p, inner) for p in params)
        return call.get("type") != "MemberInvocation"
    if kind in ("MemberInvocation", "ThisInvocation", "IndexInvocation", "TotalInvocation"):
        return at_root  # a path that starts from the focus
    if kind == "FunctionInvocation":  # a function that starts from the focus
        name, params = _function_parts(node)
        if at_root and name not in _NO_INPUT_FUNCTIONS:
            return True
        inner = False if (name in _ITEM_FUNCTIONS and not at_root) else at_root
        return any(_reads(p, inner) for p in params)
    return any(_reads(k, at_root) for k in kids)


def _function_parts(call: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(name, argument expressions) of a FunctionInvocation node (:func:`_params` of its one
    child)."""
    kids = _children(call)
    if len(kids) != 1:
        raise _Unsupported("unexpected function invocation")
    return _params(kids[0])


#: expressions parsed in this process (trial conditions: a few hundred at most)
_PARSED: dict[str, ParsedExpression] = {}
_PARSED_LOCK = threading.Lock()


def parse_expression(expression: str) -> ParsedExpression:
    """Parse ``expression`` with fhirpathpy's grammar, once per process.

    fhirpathpy's own ``parse`` recovers silently from most syntax errors, so the expression is
    parsed with an error listener that records every error, the whole input must be consumed,
    and fhirpathpy's tree is then built from that same parse (ANTLR parsing is slow: about 0.1 s
    per condition, so it is never done twice).
    """
    with _PARSED_LOCK:
        done = _PARSED.get(expression)
    if done is None:
        done = _parse(expression)
        with _PARSED_LOCK:
            done = _PARSED.setdefault(expression, done)
    return done


def parsed_expressions(expressions: Iterable[str]) -> list[ParsedExpression]:
    """The parses of ``expressions`` (for caching them with a compiled trial)."""
    return [parse_expression(e) for e in expressions]


def remember_parsed(parsed: Iterable[ParsedExpression]) -> None:
    """Reuse parses made earlier (e.g. loaded from the compiled-trial cache)."""
    with _PARSED_LOCK:
        for p in parsed:
            _PARSED.setdefault(p.expression, p)


def _error_collector(base: type, found: list[str]) -> type:
    """An ANTLR error listener class (``base`` is ANTLR's, imported only when parsing) that
    appends each syntax error, with its column, to ``found``. Built with ``type()``: a class
    statement inside a function cannot be compiled with mypyc."""

    def syntax_error(
        self: Any, recognizer: Any, offending: Any, line: int, column: int, msg: str, e: Any
    ) -> None:
        found.append(f"column {column + 1}: {msg}")

    return type("_Collect", (base,), {"syntaxError": syntax_error})


def _parse(expression: str) -> ParsedExpression:
    from antlr4 import CommonTokenStream, InputStream, Token
    from antlr4.error.ErrorListener import ErrorListener
    from antlr4.tree.Tree import ParseTreeWalker
    from fhirpathpy.parser.ASTPathListener import ASTPathListener
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    found: list[str] = []

    collect = _error_collector(ErrorListener, found)

    if not expression or not expression.strip():
        return ParsedExpression(expression, None, ("empty expression",))
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(collect())
    stream = CommonTokenStream(lexer)
    parser = FHIRPathParser(stream)
    parser.buildParseTrees = True
    parser.removeErrorListeners()
    parser.addErrorListener(collect())
    root = None
    try:
        root = parser.expression()
    except Exception as exc:  # ANTLR raises its own RecognitionException subclasses
        found.append(f"cannot parse: {exc}")
    if not found and stream.LA(1) != Token.EOF:
        tok = stream.LT(1)
        found.append(
            f"column {tok.column + 1}: unexpected {tok.text!r} after a complete expression"
        )
    tree: dict[str, Any] | None = None
    if not found:
        try:
            listener = ASTPathListener()
            ParseTreeWalker().walk(listener, root)
            tree = listener.parentStack[0]
        except Exception as exc:  # fhirpathpy raises plain exceptions for unsupported constructs
            found.append(f"fhirpathpy cannot compile it: {exc}")
    return ParsedExpression(expression, tree if not found else None, tuple(found))


class CompiledExpression:
    """A FHIRPath expression compiled once; call it with ``(resource, variables)``.

    Returns the result collection as ``fhirpathpy`` would. ``native`` is True when the expression
    was compiled to closures, False when fhirpathpy evaluates it.
    """

    __slots__ = ("_code", "_fallback", "expression", "native", "reason")

    def __init__(
        self, expression: str, *, native: bool = True, terminology: Terminology | None = None
    ) -> None:
        self.expression = expression
        self._code: _Code | None = None
        self._fallback: Callable[..., list[Any]] | None = None
        #: why the expression is evaluated by fhirpathpy (None when compiled natively)
        self.reason: str | None = "native compilation disabled"
        parsed = parse_expression(expression)
        if parsed.tree is None:
            raise ValueError(f"FHIRPath {expression!r}: {'; '.join(parsed.problems)}")
        tree = parsed.tree
        if native:
            token = _TERMINOLOGY.set(terminology)
            try:
                kids = _children(tree)
                if len(kids) != 1:
                    raise _Unsupported("unexpected parse tree")
                self._code = _compile(kids[0])
                self.reason = None
            except _Unsupported as exc:
                self.reason = str(exc)
            finally:
                _TERMINOLOGY.reset(token)
        if self._code is None:
            from fhirpathpy import apply_parsed_path
            from fhirpathpy.engine.util import set_paths

            # fhirpathpy.compile(expression) without parsing again; its own copy of the tree
            self._fallback = set_paths(
                apply_parsed_path,
                parsedPath=copy.deepcopy(tree),
                model=None,
                options={"userInvocationTable": _user_functions(terminology)},
            )
        self.native = self._code is not None

    def __call__(self, resource: Any, variables: Mapping[str, Any] | None = None) -> list[Any]:
        if self._code is None:
            assert self._fallback is not None
            return self._fallback(resource, dict(variables or {}))
        env = {"context": resource, "ucum": UCUM}
        if variables:
            env.update(variables)
        items = self._code.step(_arraify(resource), env)
        if self._code.boolean:
            return items
        return _result(items, self._code.navigated)

    def __repr__(self) -> str:
        how = "native" if self.native else f"fhirpathpy ({self.reason})"
        return f"CompiledExpression({self.expression!r}, {how})"


def _user_functions(terminology: Terminology | None) -> dict[str, Any]:
    """fhirmatch's functions for fhirpathpy (``memberOf``), bound to ``terminology``."""

    def member(inputs: list[Any], url: Any) -> list[Any]:
        if not isinstance(url, str):
            raise ValueError("memberOf() needs a ValueSet URL")
        return member_of(terminology, url, list(inputs))

    return {"memberOf": {"fn": member, "arity": {1: ["String"]}}}


def compile_expression(
    expression: str, *, native: bool = True, terminology: Terminology | None = None
) -> CompiledExpression:
    """Compile ``expression`` once; ``native=False`` forces evaluation by fhirpathpy.
    ``terminology`` resolves the ValueSets ``memberOf()`` names.

    Raises ``ValueError`` listing the syntax problems of an expression that does not parse
    (:func:`parse_expression`).
    """
    return CompiledExpression(expression, native=native, terminology=terminology)
