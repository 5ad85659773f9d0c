"""Stripe list objects, cursor pagination and ``expand``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sandbox.errors import invalid_request
from sandbox.params import get_int, get_str

__all__ = ["created_filter", "expand", "list_object", "paginate"]

T = TypeVar("T")


def paginate(items: Sequence[T], params: dict[str, Any]) -> tuple[list[T], bool]:
    """One page of ``items`` (newest first) by ``limit``, ``starting_after``, ``ending_before``.

    Items are objects with an ``id`` attribute or JSON dicts with an ``"id"`` key.
    """
    limit = get_int(params, "limit", minimum=1)
    if limit is None:
        limit = 10
    if limit > 100:
        raise invalid_request(
            "This value must be less than or equal to 100.",
            code="parameter_invalid_integer",
            param="limit",
        )
    after = get_str(params, "starting_after")
    before = get_str(params, "ending_before")
    cursor = after if after is not None else before
    if cursor is None:
        return list(items[:limit]), len(items) > limit
    ids = [_id_of(item) for item in items]
    if cursor not in ids:
        param = "starting_after" if after is not None else "ending_before"
        raise invalid_request(f"No such object: '{cursor}'", code="resource_missing", param=param)
    index = ids.index(cursor)
    if after is not None:
        rest = items[index + 1 :]
        return list(rest[:limit]), len(rest) > limit
    newer = items[:index]
    return list(newer[-limit:]), len(newer) > limit


def _id_of(item: Any) -> str:
    return str(item["id"] if isinstance(item, dict) else item.id)


def created_filter(params: dict[str, Any]) -> Callable[[int], bool]:
    """Stripe's ``created`` list filter: ``created=T`` or ``created[gt|gte|lt|lte]=T``."""
    raw = params.get("created")
    if raw is None or raw == "":
        return lambda _created: True
    if isinstance(raw, str):
        exact = get_int(params, "created")
        return lambda created: created == exact
    if not isinstance(raw, dict) or set(raw) - {"gt", "gte", "lt", "lte"}:
        raise invalid_request("Invalid created filter", param="created")
    bounds = {op: get_int(raw, op) for op in raw}
    checks: dict[str, Callable[[int, int], bool]] = {
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }
    return lambda created: all(
        checks[op](created, bound) for op, bound in bounds.items() if bound is not None
    )


def list_object(page: list[dict[str, Any]], has_more: bool, url: str) -> dict[str, Any]:
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def expand(
    obj: dict[str, Any], paths: list[str], lookup: Callable[[str], dict[str, Any] | None]
) -> dict[str, Any]:
    """Replace id strings named by ``paths`` (``latest_charge``, ``data.payment_intent``...)."""
    for path in paths:
        _expand_path(obj, path.split("."), lookup)
    return obj


def _expand_path(
    node: Any, segments: list[str], lookup: Callable[[str], dict[str, Any] | None]
) -> None:
    if not segments:
        return
    if isinstance(node, list):
        for item in node:
            _expand_path(item, segments, lookup)
        return
    if not isinstance(node, dict):
        return
    head, rest = segments[0], segments[1:]
    if head not in node:
        raise invalid_request(f"This property cannot be expanded ({head}).", param="expand")
    value = node[head]
    if isinstance(value, str):
        found = lookup(value)
        if found is None:
            raise invalid_request(f"This property cannot be expanded ({head}).", param="expand")
        node[head] = value = found
    _expand_path(value, rest, lookup)
