"""Decode Stripe's form encoding: ``a[b][c]=v`` nests dicts, ``a[0]=v`` / ``a[]=v`` build lists.

The stripe SDK sends every POST body (and every GET query string) this way, e.g.
``metadata[payment_id]=pay_1&expand[0]=latest_charge&payment_method_types[0]=card``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

__all__ = ["FormDecodeError", "decode_form"]

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


class FormDecodeError(ValueError):
    """The body cannot be decoded into one consistent tree (e.g. ``a=1&a[b]=2``)."""


def _segments(key: str) -> list[str]:
    match = _KEY.match(key)
    if match is None:
        return [key]
    return [match.group(1), *_SEGMENT.findall(match.group(2))]


def _insert(tree: dict[str, Any], path: list[str], value: str, full_key: str) -> None:
    node = tree
    for i, segment in enumerate(path):
        last = i == len(path) - 1
        if segment == "":
            # ``a[]=x``: append, i.e. the next free numeric index.
            segment = str(sum(1 for k in node if k.isdigit()))
        if last:
            if isinstance(node.get(segment), dict):
                raise FormDecodeError(f"Conflicting values for parameter: {full_key}")
            node[segment] = value
            return
        child = node.setdefault(segment, {})
        if not isinstance(child, dict):
            raise FormDecodeError(f"Conflicting values for parameter: {full_key}")
        node = child


def _listify(node: Any) -> Any:
    """Turn every dict whose keys are all integers into a list ordered by index."""
    if not isinstance(node, dict):
        return node
    converted = {k: _listify(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


def decode_form(body: bytes | str) -> dict[str, Any]:
    """Decode an ``application/x-www-form-urlencoded`` body with bracket nesting.

    Leaves are strings (the wire has no types); an empty value stays ``""``.
    """
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    tree: dict[str, Any] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        _insert(tree, _segments(key), value, key)
    result = _listify(tree)
    if not isinstance(result, dict):  # a body of only ``0=x`` keys
        return {str(i): v for i, v in enumerate(result)}
    return result
