"""Paginators: how the next request of a stream is built from the last response.

Each paginator is a small class with three methods (the shape of dlt's REST client):
``initial_state()``, ``update_request(state, params, url)`` for the request to send next, and
``update_state(state, page)`` for the state after a page and whether more pages follow.

The state is a JSON-serialisable dict. It is persisted between messages (``sync_tasks.fetch_state``)
and alone resumes the stream, so paginators keep nothing else between calls and never mutate
the state they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

import httpx

from connectors.base import Record
from connectors.rest.config import (
    CursorPaginatorConfig,
    LinkPaginatorConfig,
    NonePaginatorConfig,
    OffsetPaginatorConfig,
    PagePaginatorConfig,
    PaginatorConfig,
    ParamValue,
)
from errors import UpstreamError

PageState = dict[str, Any]
Params = dict[str, ParamValue]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


def lookup(body: Any, path: str) -> Any:
    """The value at dotted ``path`` in a JSON body, or ``MISSING`` when any step is absent."""
    value = body
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


@dataclass(frozen=True, slots=True)
class Page:
    """One upstream response: the HTTP response, its decoded JSON body and the records in it."""

    response: httpx.Response
    body: Any
    records: list[Record]


class Paginator(Protocol):
    """Turns a stream of pages into requests; see the module docstring."""

    def initial_state(self) -> PageState:
        """The state before the first page."""
        ...

    def update_request(self, state: PageState, params: Params, url: str) -> tuple[str, Params]:
        """The URL and query parameters of the next request (``params`` may be modified and returned)."""
        ...

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        """The state after ``page`` and whether another page follows.

        Raises:
            UpstreamError: the page lacks what the paginator needs (e.g. ``has_more``).
        """
        ...


def _has_more(page: Page, path: str) -> bool:
    value = lookup(page.body, path)
    if value is MISSING:
        raise UpstreamError(f"pagination key {path!r} is missing from the response")
    if not isinstance(value, bool):
        raise UpstreamError(f"pagination key {path!r} is {type(value).__name__}, expected a boolean")
    return value


class SinglePagePaginator:
    """``{"type": "none"}``: one request returns every record."""

    def initial_state(self) -> PageState:
        return {}

    def update_request(self, state: PageState, params: Params, url: str) -> tuple[str, Params]:
        return url, params

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        return {}, False


class OffsetPaginator:
    """``{"type": "offset"}``: state ``{"offset": n}``, the number of records already read."""

    def __init__(self, config: OffsetPaginatorConfig) -> None:
        self.config = config

    def initial_state(self) -> PageState:
        return {"offset": 0}

    def update_request(self, state: PageState, params: Params, url: str) -> tuple[str, Params]:
        params[self.config.offset_param] = int(state["offset"])
        params[self.config.limit_param] = self.config.limit
        return url, params

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        count = len(page.records)
        more = _has_more(page, self.config.has_more) if self.config.has_more else count >= self.config.limit
        # An empty page ends the stream even if the upstream claims more: it would never advance.
        return {"offset": int(state["offset"]) + count}, more and count > 0


class PageNumberPaginator:
    """``{"type": "page"}``: state ``{"page": n}``, the number of the next page to request."""

    def __init__(self, config: PagePaginatorConfig) -> None:
        self.config = config

    def initial_state(self) -> PageState:
        return {"page": self.config.first_page}

    def update_request(self, state: PageState, params: Params, url: str) -> tuple[str, Params]:
        params[self.config.page_param] = int(state["page"])
        params[self.config.size_param] = self.config.size
        return url, params

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        count = len(page.records)
        more = _has_more(page, self.config.has_more) if self.config.has_more else count >= self.config.size
        return {"page": int(state["page"]) + 1}, more and count > 0


class CursorPaginator:
    """``{"type": "cursor"}``: state ``{"cursor": c}``; ``None`` before the first page."""

    def __init__(self, config: CursorPaginatorConfig, *, primary_key: str) -> None:
        self.config = config
        self.primary_key = primary_key

    def initial_state(self) -> PageState:
        return {"cursor": None}

    def update_request(self, state: PageState, params: Params, url: str) -> tuple[str, Params]:
        cursor = state.get("cursor")
        if cursor is not None:
            params[self.config.cursor_param] = cursor
        if self.config.limit_param is not None and self.config.limit is not None:
            params[self.config.limit_param] = self.config.limit
        return url, params

    def _next_cursor(self, page: Page) -> Any:
        if self.config.cursor_path is not None:
            value = lookup(page.body, self.config.cursor_path)
            return None if value is MISSING else value
        if not page.records:
            return None
        return page.records[-1].get(self.primary_key)

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        cursor = self._next_cursor(page)
        if cursor is not None and not isinstance(cursor, str | int):
            raise UpstreamError(f"next cursor is {type(cursor).__name__}, expected a string or integer")
        if self.config.has_more:
            more = _has_more(page, self.config.has_more)
            if more and cursor is None:
                where = self.config.cursor_path or f"the last record's {self.primary_key!r}"
                raise UpstreamError(f"{self.config.has_more!r} is true but there is no next cursor at {where}")
        else:
            short = self.config.limit is not None and len(page.records) < self.config.limit
            more = cursor is not None and bool(page.records) and not short
        if more and cursor == state.get("cursor"):
            raise UpstreamError(f"the cursor did not advance ({cursor!r} again); the stream would never end")
        return {"cursor": cursor}, more


class LinkHeaderPaginator:
    """``{"type": "link"}``: state ``{"next_url": u}``, the URL of the ``rel="next"`` link.

    A next link must stay on the origin of ``base_url``: the credentials go wherever it points.
    """

    def __init__(self, base_url: str) -> None:
        self.origin = httpx.URL(base_url)

    def initial_state(self) -> PageState:
        return {"next_url": None}

    def update_request(self, state: PageState, params: Params, url: str) -> tuple[str, Params]:
        next_url = state.get("next_url")
        if next_url:
            # The next link carries the whole query string, filters included.
            return str(next_url), {}
        return url, params

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        target = page.response.links.get("next", {}).get("url")
        if not target:
            return {"next_url": None}, False
        try:
            next_url = page.response.url.join(target)
        except httpx.InvalidURL as exc:
            raise UpstreamError(f'Link rel="next" is not a URL: {exc}') from None
        # raw_host (ASCII, as sent): ``.host`` IDNA-decodes, and raises on a label idna cannot decode.
        if (next_url.scheme, next_url.raw_host, next_url.port) != (
            self.origin.scheme,
            self.origin.raw_host,
            self.origin.port,
        ):
            raise UpstreamError(f'Link rel="next" points outside base_url: {next_url.copy_with(query=None)}')
        if str(next_url) == state.get("next_url"):
            raise UpstreamError('Link rel="next" points at the page just read; the stream would never end')
        return {"next_url": str(next_url)}, True


def make_paginator(config: PaginatorConfig, *, primary_key: str, base_url: str) -> Paginator:
    """The paginator for one resource's validated ``paginator`` config."""
    if isinstance(config, NonePaginatorConfig):
        return SinglePagePaginator()
    if isinstance(config, OffsetPaginatorConfig):
        return OffsetPaginator(config)
    if isinstance(config, PagePaginatorConfig):
        return PageNumberPaginator(config)
    if isinstance(config, CursorPaginatorConfig):
        return CursorPaginator(config, primary_key=primary_key)
    if isinstance(config, LinkPaginatorConfig):
        return LinkHeaderPaginator(base_url)
    raise AssertionError(f"unhandled paginator config {type(config).__name__}")
