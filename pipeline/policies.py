"""Field policies applied: a resource's document as one caller may see it.

A ``FieldPolicy`` (declared by the connector next to the document shape) says which rows a
technician owns and which fields roles and feature toggles hide. This module turns it into a
pure function over the decoded document, plus a short key naming the resulting view.

Rules, for technicians (admins and managers always see the whole document):

- only rows (``policy.rows``) whose ``owner_list`` has an entry with ``owner_key`` equal to the
  caller's ``employee_id`` are kept; ids compare as strings, so ``"1001"`` matches ``1001``;
  a technician without an employee id owns no row;
- ``technician_hidden`` fields are removed from every kept row;
- a toggle rule hides its (dotted) path when the company's toggle equals ``hide_when``; a
  toggle that is not set means *shown*. Values read as booleans: ``true``/``false``, ``1``/``0``
  and the strings ``"true" "false" "1" "0" "yes" "no" "on" "off"`` (any case). Any other value
  is ambiguous and hides the field: a typo in a toggle must not leak data;
- ``drop_when_empty`` objects emptied by hiding are removed;
- hidden means *absent*: the key is deleted, never set to null;
- other top-level lists of objects that carry ``owner_key`` (the schedule's ``employees``) are
  reduced to the owners that appear in the kept rows, so a technician learns nothing about
  colleagues' days beyond the jobs they share; ``counts`` is recomputed for every list that was
  filtered. Lists keyed otherwise (the schedule's ``teams``) are left as they are;
- when ``policy.rows`` is ``None`` the field rules apply to the document itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from connectors.policy import FieldPolicy

ROLES = ("admin", "manager", "technician")
PRIVILEGED_ROLES = frozenset({"admin", "manager"})
FULL_VIEW = "full"
"""The view key of an unfiltered document: its stored bytes can be served as they are."""

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def toggle_value(value: Any) -> bool | None:
    """Read a feature toggle as a boolean; ``None`` when it is unset or not recognisably boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


def hidden_paths(policy: FieldPolicy, toggles: Mapping[str, Any]) -> frozenset[str]:
    """The dotted paths the company's ``toggles`` hide from technicians under ``policy``."""
    hidden: set[str] = set()
    for rule in policy.toggle_rules:
        if rule.toggle not in toggles or toggles[rule.toggle] is None:
            continue
        value = toggle_value(toggles[rule.toggle])
        if value is None or value == rule.hide_when:
            hidden.add(rule.path)
    return frozenset(hidden)


def _is_identity(policy: FieldPolicy, role: str, hidden: frozenset[str]) -> bool:
    if role in PRIVILEGED_ROLES:
        return True
    return policy.rows is None and not policy.technician_hidden and not hidden


def view_key(policy: FieldPolicy, role: str, employee_id: str | int | None, toggles: Mapping[str, Any]) -> str:
    """A short stable name for the view ``apply_policy`` gives these inputs.

    Two callers get the same key exactly when they get the same filtered output from the same
    document, so the key can be part of an ETag and of a (checksum, view) body cache key.
    ``FULL_VIEW`` means the document is served unchanged.
    """
    hidden = hidden_paths(policy, toggles)
    if _is_identity(policy, role, hidden):
        return FULL_VIEW
    owner = None
    if policy.rows is not None and policy.owner_list is not None:
        owner = None if employee_id is None else str(employee_id)
    material = orjson.dumps(
        {
            "rows": policy.rows,
            "owner_list": policy.owner_list,
            "owner_key": policy.owner_key,
            "owner": owner,
            "technician_hidden": sorted(policy.technician_hidden),
            "hidden": sorted(hidden),
            "drop_when_empty": sorted(policy.drop_when_empty),
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return "t" + hashlib.sha256(material).hexdigest()[:20]


def apply_policy(
    document: Mapping[str, Any],
    policy: FieldPolicy,
    *,
    role: str,
    employee_id: str | int | None,
    toggles: Mapping[str, Any],
) -> dict[str, Any]:
    """Return ``document`` as the caller may see it; ``document`` itself is never modified.

    Parameters:
        document: the decoded document (may be shared, e.g. cached).
        policy: the resource's field policy.
        role: ``admin``, ``manager`` or ``technician``; any other role is treated as a technician.
        employee_id: the caller's employee id (technicians).
        toggles: the company's feature toggles.

    Returns:
        A new document: a shallow copy for admins and managers, a filtered copy otherwise
        (hidden keys absent, not null).
    """
    hidden = hidden_paths(policy, toggles)
    if _is_identity(policy, role, hidden):
        return dict(document)
    fields = _FieldFilter(policy, hidden)
    if policy.rows is None:
        return fields.apply(document)

    result = dict(document)
    rows = document.get(policy.rows)
    if not isinstance(rows, list):
        # Missing, or not a list of rows: nothing a technician can be shown safely (defect 16:
        # a document without its rows key used to be returned whole).
        result[policy.rows] = []
        kept: list[Mapping[str, Any]] = []
    else:
        kept = [row for row in rows if isinstance(row, Mapping) and _owns(policy, row, employee_id)]
        result[policy.rows] = [fields.apply(row) for row in kept]
    filtered = {policy.rows: len(result[policy.rows])}

    if policy.owner_list is not None and policy.owner_key is not None:
        owners = _owners(policy, kept)
        for key, value in document.items():
            if key == policy.rows or not isinstance(value, list):
                continue
            if any(isinstance(item, Mapping) and policy.owner_key in item for item in value):
                result[key] = [
                    item for item in value if isinstance(item, Mapping) and str(item.get(policy.owner_key)) in owners
                ]
                filtered[key] = len(result[key])

    counts = document.get("counts")
    if isinstance(counts, Mapping):
        result["counts"] = {**counts, **{key: n for key, n in filtered.items() if key in counts}}
    return result


def _owns(policy: FieldPolicy, row: Mapping[str, Any], employee_id: str | int | None) -> bool:
    if policy.owner_list is None:
        return True
    if employee_id is None or policy.owner_key is None:
        return False
    wanted = str(employee_id)
    assignees = row.get(policy.owner_list)
    if not isinstance(assignees, list):
        return False
    return any(
        isinstance(entry, Mapping) and policy.owner_key in entry and str(entry[policy.owner_key]) == wanted
        for entry in assignees
    )


def _owners(policy: FieldPolicy, rows: list[Mapping[str, Any]]) -> set[str]:
    assert policy.owner_list is not None and policy.owner_key is not None
    owners: set[str] = set()
    for row in rows:
        for entry in row.get(policy.owner_list) or ():
            if isinstance(entry, Mapping) and policy.owner_key in entry:
                owners.add(str(entry[policy.owner_key]))
    return owners


class _FieldFilter:
    """Removes hidden fields from one object, copying only what it changes."""

    def __init__(self, policy: FieldPolicy, hidden: frozenset[str]) -> None:
        self.top = frozenset(policy.technician_hidden) | {path for path in hidden if "." not in path}
        self.nested: dict[str, list[list[str]]] = {}
        for path in sorted(hidden):
            if "." in path:
                head, *rest = path.split(".")
                self.nested.setdefault(head, []).append(rest)
        self.drop_when_empty = frozenset(policy.drop_when_empty)

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        result = {key: value for key, value in obj.items() if key not in self.top}
        for head, paths in self.nested.items():
            child = result.get(head)
            if not isinstance(child, Mapping):
                continue
            pruned = _without_paths(child, paths)
            if not pruned and head in self.drop_when_empty:
                del result[head]
            else:
                result[head] = pruned
        return result


def _without_paths(obj: Mapping[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    direct = {path[0] for path in paths if len(path) == 1}
    result = {key: value for key, value in obj.items() if key not in direct}
    deeper: dict[str, list[list[str]]] = {}
    for path in paths:
        if len(path) > 1:
            deeper.setdefault(path[0], []).append(path[1:])
    for key, rest in deeper.items():
        child = result.get(key)
        if isinstance(child, Mapping):
            result[key] = _without_paths(child, rest)
    return result
