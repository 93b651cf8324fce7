"""GraphQL paginators: the variables of the next request from the state, the state from a page.

The same shape as ``connectors.rest.paginators`` (state is a JSON-serialisable dict persisted
between messages; nothing else is kept between calls), with query variables in place of URL
parameters.
"""

from __future__ import annotations

from typing import Any, Protocol

from connectors.graphql.config import (
    NonePaginatorConfig,
    OffsetPaginatorConfig,
    PaginatorConfig,
    RelayPaginatorConfig,
)
from connectors.rest.paginators import MISSING, Page, PageState, lookup
from errors import UpstreamError

Variables = dict[str, Any]


class Paginator(Protocol):
    def initial_state(self) -> PageState:
        """The state before the first page."""
        ...

    def update_variables(self, state: PageState, variables: Variables) -> Variables:
        """The variables of the next request (``variables`` may be modified and returned)."""
        ...

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        """The state after ``page`` and whether another page follows.

        Raises:
            UpstreamError: the page lacks what the paginator needs (e.g. ``pageInfo``).
        """
        ...


class SinglePagePaginator:
    """``{"type": "none"}``."""

    def initial_state(self) -> PageState:
        return {}

    def update_variables(self, state: PageState, variables: Variables) -> Variables:
        return variables

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        return {}, False


class RelayPaginator:
    """``{"type": "relay"}``: state ``{"after": cursor}``, ``None`` before the first page."""

    def __init__(self, config: RelayPaginatorConfig) -> None:
        self.config = config

    def initial_state(self) -> PageState:
        return {"after": None}

    def update_variables(self, state: PageState, variables: Variables) -> Variables:
        variables[self.config.first_variable] = self.config.first
        variables[self.config.after_variable] = state["after"]
        return variables

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        path = self.config.page_info
        info = lookup(page.body, path)
        if not isinstance(info, dict):
            kind = "missing" if info is MISSING else f"{type(info).__name__}, expected an object"
            raise UpstreamError(f"pageInfo at {path!r} is {kind}")
        more, cursor = info.get("hasNextPage"), info.get("endCursor")
        if not isinstance(more, bool):
            raise UpstreamError(f"{path}.hasNextPage is {type(more).__name__}, expected a boolean")
        if not more:
            return {"after": cursor if isinstance(cursor, str) else state["after"]}, False
        if not isinstance(cursor, str) or not cursor:
            raise UpstreamError(f"{path}.hasNextPage is true but {path}.endCursor is {cursor!r}")
        if cursor == state["after"]:
            raise UpstreamError(f"{path}.endCursor did not advance ({cursor!r} again); the stream would never end")
        if not page.records:
            raise UpstreamError(f"{path}.hasNextPage is true on an empty page; the stream would never end")
        return {"after": cursor}, True


class OffsetPaginator:
    """``{"type": "offset"}``: state ``{"offset": n}``, the number of records already read."""

    def __init__(self, config: OffsetPaginatorConfig) -> None:
        self.config = config

    def initial_state(self) -> PageState:
        return {"offset": 0}

    def update_variables(self, state: PageState, variables: Variables) -> Variables:
        variables[self.config.offset_variable] = int(state["offset"])
        variables[self.config.limit_variable] = self.config.limit
        return variables

    def update_state(self, state: PageState, page: Page) -> tuple[PageState, bool]:
        count = len(page.records)
        if self.config.has_more is not None:
            more = lookup(page.body, self.config.has_more)
            if not isinstance(more, bool):
                raise UpstreamError(f"pagination key {self.config.has_more!r} is not a boolean")
        else:
            more = count >= self.config.limit
        return {"offset": int(state["offset"]) + count}, more and count > 0


def make_paginator(config: PaginatorConfig) -> Paginator:
    if isinstance(config, RelayPaginatorConfig):
        return RelayPaginator(config)
    if isinstance(config, OffsetPaginatorConfig):
        return OffsetPaginator(config)
    if isinstance(config, NonePaginatorConfig):
        return SinglePagePaginator()
    raise AssertionError(f"unhandled paginator config {type(config).__name__}")
