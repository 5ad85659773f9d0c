"""/openapi.json describes the API as it behaves: schemathesis, with a valid agent key,
sends schema-valid and schema-invalid requests to every operation of a real server and
checks there is no 5xx, no undocumented status, header or content type, and no response
that breaks its schema."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tasks import money
from tasks.settings import Settings
from tests.test_api_client import live_api, make_agent

EXAMPLES = 15  # per operation and mode: a few seconds in all


def test_openapi_document_covers_security_and_errors(settings: Settings) -> None:
    from api.app import create_app

    document = create_app(settings).openapi()
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "422" not in codes, (method, path)
            if path.startswith("/v1/") and not path.startswith("/v1/webhooks/"):
                assert {"401"} <= codes, (method, path)
                # The operators' routes (api/routes/ops.py) authenticate in a dependency of
                # their own that also takes HTTP Basic, which FastAPI cannot document.
                if not path.startswith("/v1/ops/"):
                    assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
            # A key reused with another request, or still in flight, is a 409.
            if any(p["name"] == "Idempotency-Key" for p in operation.get("parameters", [])):
                assert "409" in codes, (method, path)
    # Every currency a request takes is one of those the server accepts.
    schemas = document["components"]["schemas"]
    for name in ("PaymentCreate", "DepositCreate", "PriceSet"):
        assert schemas[name]["properties"]["currency"]["enum"] == sorted(money.CURRENCIES), name
    create = document["paths"]["/v1/payments"]["post"]
    assert {"409", "413", "429"} <= set(create["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in create["parameters"])
    assert "Retry-After" in create["responses"]["429"]["headers"]
    # A response field with a default is sent all the same: the schema says it is always
    # there (a generated client typed `amount_lost_to_disputes` or `breakdown` as optional).
    for name in ("Payment", "Refund", "Price", "PaymentList"):
        properties = set(schemas[name]["properties"])
        assert set(schemas[name]["required"]) == properties, name
    # What an agent sends keeps its defaults optional.
    assert "capture_method" not in schemas["PaymentCreate"].get("required", [])


def _tags() -> list[str]:
    """The document's tags (one schemathesis run each, so a failure names its owner)."""
    from api.app import create_app

    document = create_app(Settings(database_url="postgresql://unused/unused")).openapi()
    found = {
        (operation.get("tags") or ["untagged"])[0]
        for operations in document["paths"].values()
        for operation in operations.values()
    }
    return sorted(found)


def _within_rules_no_schema_states(body: Any) -> bool:
    """A schema cannot state a sum, nor a bound that depends on another field: the custom line
    items' total (unit amount x quantity, added up) must be chargeable in the currency (within
    the limit, in its steps), and a payment's total must reach the provider's smallest charge
    in it (docs/api.md, "Validation"). A schema-valid body outside them is refused with a 400,
    as documented."""
    if not isinstance(body, dict):
        return True
    currency = str(body.get("currency"))
    lines = body.get("line_items")
    if isinstance(lines, list):
        lines = [line for line in lines if isinstance(line, dict)]
        custom = [line for line in lines if not line.get("sku")]
        total = sum(int(i.get("unit_amount") or 0) * int(i.get("quantity") or 1) for i in custom)
        if custom and money.amount_problem(total, currency) and currency in money.CURRENCIES:
            return False
        if len(custom) < len(lines):
            return True  # catalog lines: pricing judges the whole total
    else:
        total = body.get("amount")
    minimum = Settings().min_charge_amount.get(currency, 0)
    return not isinstance(total, int) or total >= minimum


@pytest.mark.parametrize("tag", _tags())
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    settings: Settings, database_url: str, tag: str
) -> None:
    key = make_agent(database_url, "fuzz-agent")
    headers = {"Authorization": f"Bearer {key}"}
    with live_api(settings) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        schema.config.update(base_url=url, headers=headers)
        operations = [
            op
            for op in (result.ok() for result in schema.get_all_operations())
            if ((op.definition.raw.get("tags") or ["untagged"])[0]) == tag
        ]
        assert operations
        failures: list[str] = []
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=operation.as_strategy(generation_mode=mode))
                @hypothesis_settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    derandomize=True,
                    database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                def check(case: Any) -> None:
                    if case.meta.generation.mode is GenerationMode.POSITIVE:
                        assume(_within_rules_no_schema_states(case.body))
                    case.call_and_validate(headers=headers)

                try:
                    check()
                except Unsatisfiable:
                    # Nothing can be invalid about an operation without parameters.
                    assert mode is GenerationMode.NEGATIVE, operation.label
                except (Exception, BaseExceptionGroup) as error:
                    failures.append(f"{operation.label} ({mode.value}): {error}")
        assert not failures, "\n\n".join(failures)
