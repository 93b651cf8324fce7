"""schemathesis hooks for the running-server contract run (``SCHEMATHESIS_HOOKS``, test_contract.py).

One rule of the company writes is not a JSON Schema: a ``graphql`` resource's ``query`` must be one
GraphQL query operation declaring every variable the resource sets. The OpenAPI document states it
in words (the field's description, ``contentMediaType: application/graphql``, and the 422 of POST
and PATCH /companies); this hook is the generator extension schemathesis recommends for such a rule
("extend generators to match runtime rules"): before a request is sent, each graphql query the
fuzzer wrote is replaced by one that obeys the rule for the rest of the resource as generated.

Every other field stays as generated, and no check is switched off: schemathesis revalidates a
case a ``before_call`` hook edited, so a body that is still schema-invalid stays a negative case
(and must be refused), and a schema-valid one must be accepted — positive data acceptance holds
for the company writes, graphql bodies included.
"""

from __future__ import annotations

from typing import Any

import schemathesis

MAX_QUERY_LENGTH = 50_000
PAGINATOR_DEFAULTS = {
    "relay": {"first_variable": "first", "after_variable": "after"},
    "offset": {"offset_variable": "offset", "limit_variable": "limit"},
}


def variables_set(resource: dict[str, Any]) -> list[str]:
    """The variables a graphql resource sets: ``variables``' keys, the paginator's, the incremental one."""
    names = list(resource.get("variables") or {}) if isinstance(resource.get("variables"), dict) else []
    paginator = resource.get("paginator")
    if isinstance(paginator, dict):
        for key, default in PAGINATOR_DEFAULTS.get(str(paginator.get("type")), {}).items():
            names.append(paginator.get(key, default))
    incremental = resource.get("incremental")
    if isinstance(incremental, dict):
        names.append(incremental.get("variable"))
    return list(dict.fromkeys(name for name in names if isinstance(name, str)))


def a_query_declaring(names: list[str]) -> str:
    declared = f"({', '.join(f'${name}: JSON' for name in names)})" if names else ""
    return f"query Contract{declared} {{ records {{ id }} }}"


def with_valid_queries(body: Any) -> None:
    """Replace, in place, each graphql resource's string ``query`` with one that obeys the rule."""
    config = body.get("config") if isinstance(body, dict) else None
    resources = config.get("resources") if isinstance(config, dict) and "endpoint" in config else None
    if not isinstance(resources, dict):
        return
    for resource in resources.values():
        if not isinstance(resource, dict) or not isinstance(resource.get("query"), str):
            continue
        query = a_query_declaring(variables_set(resource))
        # A generated query the schema refuses (empty, too long, a NUL) is left as it is: the case stays negative.
        generated = resource["query"]
        if 1 <= len(generated) <= MAX_QUERY_LENGTH and "\x00" not in generated and len(query) <= MAX_QUERY_LENGTH:
            resource["query"] = query


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.path.startswith("/companies") and case.method.upper() in {"POST", "PATCH"}:
        with_valid_queries(case.body)
