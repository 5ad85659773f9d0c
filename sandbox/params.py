"""Typed reads of decoded form parameters, failing with Stripe's validation errors."""

from __future__ import annotations

from typing import Any

from sandbox.errors import StripeAPIError, invalid_request, missing_param

__all__ = ["get_bool", "get_expand", "get_int", "get_metadata", "get_str"]


def get_str(
    params: dict[str, Any],
    name: str,
    *,
    required: bool = False,
    choices: tuple[str, ...] | None = None,
) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing_param(name)
        return None
    if not isinstance(value, str):
        raise invalid_request(
            f"Invalid string: {name}", code="parameter_invalid_string", param=name
        )
    if choices is not None and value not in choices:
        raise invalid_request(f"Invalid {name}: must be one of {', '.join(choices)}", param=name)
    return value


def get_int(
    params: dict[str, Any], name: str, *, required: bool = False, minimum: int | None = None
) -> int | None:
    raw = get_str(params, name, required=required)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise invalid_request(
            f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name
        ) from None
    if minimum is not None and value < minimum:
        message = (
            f"This value must be greater than or equal to {minimum}."
            if minimum != 1
            else "Invalid positive integer"
        )
        raise invalid_request(message, code="parameter_invalid_integer", param=name)
    return value


def get_bool(params: dict[str, Any], name: str) -> bool | None:
    raw = get_str(params, name)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise invalid_request(f"Invalid boolean: {raw}", param=name)
    return raw == "true"


def get_metadata(params: dict[str, Any], name: str = "metadata") -> dict[str, str] | None:
    """``metadata[k]=v`` pairs; ``metadata=`` (empty) means "none"; absent returns None.

    A value of ``""`` for one key removes that key when merged (Stripe's unset).
    """
    if name not in params:
        return None
    value = params[name]
    if value == "":
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid_request(
            "Invalid metadata: metadata must be a set of key-value pairs", param=name
        )
    if len(value) > 50:
        raise invalid_request("Invalid metadata: at most 50 keys are allowed", param=name)
    for key, item in value.items():
        if len(key) > 40:
            raise _metadata_error(f"Metadata keys can have up to 40 characters: {key}", name)
        if len(item) > 500:
            raise _metadata_error(f"Metadata values can have up to 500 characters: {key}", name)
    return dict(value)


def _metadata_error(message: str, name: str) -> StripeAPIError:
    return invalid_request(message, param=name)


def get_expand(params: dict[str, Any]) -> list[str]:
    value = params.get("expand")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid_request("Invalid array", param="expand")
    return list(value)
