"""Pydantic types that validate exactly what their JSON Schema says, for strict request models.

Strict models refuse coercion (``"5"`` is not an integer, ``0`` is not a boolean), but JSON
Schema's ``integer`` includes ``5.0`` (a number with no fraction), which strict ``int`` refuses:
``JsonInt`` accepts it, so a schema-valid request is never refused.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_integral)]
"""An ``int`` that also accepts an integral JSON number such as ``5.0`` (never a string or a boolean)."""
