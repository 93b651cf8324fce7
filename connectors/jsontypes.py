"""Pydantic types that validate exactly what their JSON Schema says, for strict request models.

Strict models refuse coercion (``"5"`` is not an integer, ``0`` is not a boolean), but JSON
Schema's ``integer`` includes ``5.0`` (a number with no fraction), which strict ``int`` refuses:
``JsonInt`` accepts it, so a schema-valid request is never refused.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def integral(value: Any) -> Any:
    """``5.0`` → ``5``; anything else unchanged (a ``BeforeValidator``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(integral)]
"""An ``int`` that also accepts an integral JSON number such as ``5.0`` (never a string or a boolean).

Bounds go on the model field (``x: JsonInt = Field(ge=1)``). Inside a list or an optional, write
``Annotated[int, Field(ge=1), BeforeValidator(integral)]`` instead: pydantic would otherwise put
its own ``ge`` key, which is not JSON Schema, into the document.
"""
