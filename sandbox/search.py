"""A subset of Stripe's Search Query Language, enough for PaymentIntent lookups.

Supported: clauses ``field:value`` joined by ``AND`` or by ``OR`` (not both, as in Stripe),
where field is ``metadata['key']``, ``status``, ``currency``, ``amount`` or ``created``; value is
a quoted string or a number; numeric fields also take ``>``, ``<``, ``>=``, ``<=``; a leading
``-`` negates a clause. For example ``metadata['payment_id']:'pay_x' AND status:'succeeded'``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.errors import invalid_request

__all__ = ["compile_query"]

_CLAUSE = re.compile(
    r"""
    \s*(?P<neg>-)?
    (?:metadata\[(?P<mq>['"])(?P<mkey>.*?)(?P=mq)\]|(?P<field>[a-z_]+))
    (?P<op>:|>=|<=|>|<)
    (?:(?P<vq>['"])(?P<str>.*?)(?P=vq)|(?P<num>-?\d+))
    \s*
    """,
    re.VERBOSE,
)
_JOIN = re.compile(r"(AND|OR)\s+")
_FIELDS = {"status", "currency", "amount", "created"}
_NUMERIC = {"amount", "created"}


@dataclass(frozen=True)
class _Clause:
    negate: bool
    field: str
    metadata_key: str | None
    op: str
    value: str | int

    def __call__(self, obj: Any) -> bool:
        if self.metadata_key is not None:
            actual: Any = getattr(obj, "metadata", {}).get(self.metadata_key)
        else:
            actual = getattr(obj, self.field, None)
        result = _compare(actual, self.op, self.value)
        return not result if self.negate else result


def _compare(actual: Any, op: str, value: str | int) -> bool:
    if op == ":":
        return actual is not None and str(actual) == str(value)
    if not isinstance(actual, int) or not isinstance(value, int):
        return False
    return {
        ">": actual > value,
        "<": actual < value,
        ">=": actual >= value,
        "<=": actual <= value,
    }[op]


def _bad(query: str, detail: str) -> Exception:
    return invalid_request(f"Invalid query: {detail} (in {query!r})", param="query")


def compile_query(query: str) -> Callable[[Any], bool]:
    """Compile ``query`` into a predicate over resource objects; raises a 400 on bad syntax."""
    clauses: list[_Clause] = []
    joins: set[str] = set()
    pos = 0
    while True:
        match = _CLAUSE.match(query, pos)
        if match is None:
            raise _bad(query, f"could not parse clause at position {pos}")
        field = match.group("field") or "metadata"
        if match.group("field") is not None and field not in _FIELDS:
            raise _bad(query, f"unsupported field {field!r}")
        op = match.group("op")
        if match.group("num") is not None:
            value: str | int = int(match.group("num"))
        else:
            value = match.group("str")
        if op != ":" and (field not in _NUMERIC or not isinstance(value, int)):
            raise _bad(query, f"{op} needs a numeric field and value")
        clauses.append(_Clause(bool(match.group("neg")), field, match.group("mkey"), op, value))
        pos = match.end()
        if pos == len(query):
            break
        join = _JOIN.match(query, pos)
        if join is None:
            raise _bad(query, f"expected AND or OR at position {pos}")
        joins.add(join.group(1))
        pos = join.end()
    if len(joins) > 1:
        raise _bad(query, "AND and OR cannot be combined")
    if joins == {"OR"}:
        return lambda obj: any(c(obj) for c in clauses)
    return lambda obj: all(c(obj) for c in clauses)
