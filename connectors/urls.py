"""The upstream URLs a connector config may hold, as JSON Schema patterns and as validators.

One pattern per kind of URL, used twice: in the config model's JSON Schema (so the API's OpenAPI
document states exactly what is accepted, and a client generated from it can build every valid
config) and by the model's validator, which refuses with a message naming the rule. Every URL
that matches is one httpx parses: the host is a name, an IPv4 address or a bracketed IPv6 one,
the port is 1–65535, there is no user info (credentials never sit in a URL) and no fragment.
Control characters and spaces are written out instead of ``\\s``, since generators and ``re``
disagree on what ``\\s`` covers.
"""

from __future__ import annotations

import re

_V4 = r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_H = r"[0-9A-Fa-f]{1,4}"
_V6 = (  # every textual IPv6 form (RFC 4291 §2.2) ipaddress accepts, zone ids aside
    rf"(?:(?:{_H}:){{7}}{_H}|(?:{_H}:){{1,7}}:|(?:{_H}:){{1,6}}:{_H}|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}"
    rf"|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}"
    rf"|{_H}:(?::{_H}){{1,6}}|:(?:(?::{_H}){{1,7}}|:)|::(?:[Ff]{{4}}(?::0{{1,4}})?:)?{_V4}|(?:{_H}:){{1,4}}:{_V4})"
)
_ORIGIN = (
    rf"^https?://(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*|\[{_V6}\])"
    r"(?::(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
)
_PATH = r"(?:/[^?#\x00-\x20\x7f]*)?"
_QUERY = r"(?:\?[^#\x00-\x20\x7f]*)?"

BASE_URL_PATTERN = _ORIGIN + _PATH + "$"
"""A URL that paths are appended to: an origin and an optional path, no query or fragment."""
ENDPOINT_PATTERN = _ORIGIN + _PATH + _QUERY + "$"
"""A URL requested as it is (a GraphQL endpoint, an OAuth2 token endpoint): a query is allowed."""

BASE_URL_RULE = (
    "must be an http:// or https:// URL: a host name or IPv4 address, an optional port and path,"
    " no user info, query or fragment"
)
ENDPOINT_RULE = (
    "must be an http:// or https:// URL: a host name or IP address, an optional port, path and query,"
    " no user info or fragment"
)


def check_base_url(value: str) -> str:
    """``value`` if all of it matches ``BASE_URL_PATTERN``; ``ValueError`` stating the rule otherwise.

    (``fullmatch``: ``re``'s ``$`` also matches before a final newline, a JSON Schema one does not.)
    """
    if not re.fullmatch(BASE_URL_PATTERN, value):
        raise ValueError(BASE_URL_RULE)
    return value


def check_endpoint(value: str) -> str:
    """``value`` if it matches ``ENDPOINT_PATTERN``; ``ValueError`` stating the rule otherwise."""
    if not re.fullmatch(ENDPOINT_PATTERN, value):
        raise ValueError(ENDPOINT_RULE)
    return value
