"""Field policies: which fields a role or a feature toggle hides, declared per resource.

The read API applies them; transforms declare them next to the document shape they produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ToggleRule:
    """``toggle`` set to ``hide_when`` hides ``path`` (dotted, relative to a row) for technicians."""

    toggle: str
    path: str
    hide_when: bool = False


@dataclass(frozen=True, slots=True)
class FieldPolicy:
    """How a document is filtered for restricted roles.

    Attributes:
        rows: top-level key of the list of rows the policy applies to (e.g. ``"jobs"``).
        owner_list: key in a row of the list of assignees a technician must appear in.
        owner_key: key in an assignee that holds the employee id.
        toggle_rules: per-toggle field hiding for technicians.
        technician_hidden: row fields technicians never see.
        drop_when_empty: row fields (objects) removed when all their keys were hidden.
    """

    rows: str | None = None
    owner_list: str | None = None
    owner_key: str | None = None
    toggle_rules: tuple[ToggleRule, ...] = ()
    technician_hidden: tuple[str, ...] = ()
    drop_when_empty: tuple[str, ...] = field(default=())
