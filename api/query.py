"""Query strings are checked as strictly as bodies. On the routes that take a key (checked
once the key is: api/deps.py) a parameter the route does not take (`created[ge]` for
`created[gte]`, `foo`) is a 400 `parameter_unknown`, and one that takes a single value given
twice (`limit=1&limit=2`) a 400 `parameter_invalid` — FastAPI would silently drop the one and
keep the last of the other, and an agent would read a page it did not ask for. Provider
webhooks take no key and are not checked: an endpoint may be registered with a query string
of its own."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.errors import ApiError

_MANY = (list, tuple, set, frozenset)
# Per route (path and methods): its query parameters, and whether each takes several values.
_taken: dict[tuple[str, frozenset[str]], dict[str, bool]] = {}


def _takes_many(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in _MANY:
        return True
    if origin is Annotated:
        return _takes_many(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return any(_takes_many(arg) for arg in get_args(annotation))
    return False


def _parameters(dependant: Dependant) -> Iterator[tuple[str, bool]]:
    for field in dependant.query_params:
        yield field.alias, _takes_many(field.field_info.annotation)
    for sub in dependant.dependencies:
        yield from _parameters(sub)


def check_query(request: Request) -> None:
    """Refuse the request's unknown and repeated query parameters (module doc)."""
    if not request.scope.get("query_string"):
        return  # most requests (every POST of an agent): nothing to look at
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.path.startswith("/v1/"):
        return
    key = (route.path, frozenset(route.methods or ()))
    taken = _taken.get(key)
    if taken is None:
        taken = _taken[key] = dict(_parameters(route.dependant))
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in taken:
            known = ", ".join(sorted(taken)) or "none"
            raise ApiError(
                400,
                "parameter_unknown",
                f"Unknown query parameter {name!r} (this route takes: {known})",
                param=name,
            )
        if name in seen and not taken[name]:
            raise ApiError(400, "parameter_invalid", f"{name}: give it once", param=name)
        seen.add(name)
