"""Rules every store applies to keys and metadata, so a key valid on one store is valid on all."""

from __future__ import annotations

import re
from collections.abc import Mapping

from errors import InvalidKey

_METADATA_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a safe relative ``/``-separated path.

    Segments starting with ``.`` are reserved: the local store keeps its temporary files and
    metadata sidecars under such names, so forbidding them on every store keeps listings
    identical across stores.

    Raises:
        InvalidKey: naming the key and the rule it breaks.
    """
    problem = _key_problem(key)
    if problem:
        raise InvalidKey(f"invalid blob key {key!r}: {problem}")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` unchanged if its complete segments form a valid key.

    The trailing partial segment only narrows a listing, so it may be anything a key may
    start with.

    Raises:
        InvalidKey: naming the prefix and the rule it breaks.
    """
    if prefix == "":
        return prefix
    directory, _, partial = prefix.rpartition("/")
    problem = _key_problem(directory) if directory else None
    if problem is None and (partial.startswith(".") or "\\" in partial or "\x00" in partial):
        problem = "segments must not start with '.' or contain a backslash or NUL"
    if problem is None and prefix.startswith("/"):
        problem = "must be relative, not start with '/'"
    if problem:
        raise InvalidKey(f"invalid blob prefix {prefix!r}: {problem}")
    return prefix


def normalize_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Lower-case metadata names and check both names and values travel as HTTP headers.

    S3 sends metadata as ``x-amz-meta-*`` headers, whose names are case-insensitive and whose
    values must be ASCII; the local store applies the same rules so that ``stat`` reports
    the same mapping on both.

    Raises:
        InvalidKey: naming the offending entry.
    """
    normalized: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        lowered = name.lower()
        if not _METADATA_NAME.fullmatch(lowered):
            raise InvalidKey(f"invalid metadata name {name!r}: use letters, digits and '-'")
        if not value.isascii() or not value.isprintable():
            raise InvalidKey(f"invalid value for metadata {name!r}: only printable ASCII is allowed")
        normalized[lowered] = value
    return normalized


def _key_problem(key: str) -> str | None:
    if not key:
        return "must not be empty"
    if key.startswith("/"):
        return "must be relative, not start with '/'"
    if "\\" in key:
        return "must use '/' as separator, not a backslash"
    if "\x00" in key:
        return "must not contain NUL"
    for segment in key.split("/"):
        if segment == "":
            return "must not contain empty segments ('//' or a trailing '/')"
        if segment == "..":
            return "must not contain '..'"
        if segment.startswith("."):
            return f"segment {segment!r} starts with '.', which is reserved"
    return None
