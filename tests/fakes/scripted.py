"""A scripted upstream for protocol tests: each company's config names a script (pages of
records, partitions, a hook called before every fetch) kept in this process.

It is an upstream stand-in, like the HTTP fakes: the pipeline code under test is real. The
hook lets a test stall one worker at an exact point (``threading.Event``), fail a page, or
serve different pages to different attempts.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from connectors import registry
from connectors.base import Chunk, ConnectorContext, FetchRequest, RateLimiter, Record, ResourceSpec, ResponseHook
from connectors.oauth2 import TokenStore
from errors import ConfigError

NAME = "scripted"
RESOURCE = "items"


@dataclass
class Script:
    """What the upstream serves. ``pages(request)`` returns the pages for that request (e.g.
    per attempt); ``before_fetch(request, page)`` runs before page ``page`` is served."""

    pages: Callable[[FetchRequest], Sequence[list[Record]]]
    partitions: list[str] = field(default_factory=lambda: ["all"])
    before_fetch: Callable[[FetchRequest, int], None] | None = None
    incremental_field: str | None = None
    cursor: Callable[[int], Any] = lambda page: {"page": page}
    fetches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_SCRIPTS: dict[str, Script] = {}
_ids = itertools.count(1)


def install(script: Script) -> dict[str, Any]:
    """Register ``script``; returns the connector config naming it."""
    name = f"s{next(_ids)}"
    _SCRIPTS[name] = script
    return {"script": name}


def fixed(pages: Sequence[list[Record]]) -> Callable[[FetchRequest], Sequence[list[Record]]]:
    return lambda request: pages


class ScriptedConnector:
    name = NAME

    def __init__(self, config: Mapping[str, Any], *, limiter: RateLimiter | None = None,
                 on_response: ResponseHook | None = None, tokens: TokenStore | None = None,
                 context: ConnectorContext | None = None) -> None:
        script = _SCRIPTS.get(str(config.get("script")))
        if script is None:
            raise ConfigError(f"scripted config: unknown script {config.get('script')!r}")
        self.script = script

    def resources(self) -> Sequence[ResourceSpec]:
        return [ResourceSpec(name=RESOURCE, primary_key="id", transform="identity",
                             incremental_field=self.script.incremental_field)]

    def partitions(self, resource: str, today: date) -> list[str]:
        return list(self.script.partitions)

    def fetch(self, request: FetchRequest) -> Chunk:
        page = int(((request.state or {}).get("page")) or 0) if isinstance(request.state, dict) else 0
        if self.script.before_fetch is not None:
            self.script.before_fetch(request, page)
        with self.script.lock:
            self.script.fetches += 1
        pages = self.script.pages(request)
        records = list(pages[page]) if page < len(pages) else []
        done = page + 1 >= len(pages)
        return Chunk(records=records, state=self.script.cursor(page + 1), done=done)

    def close(self) -> None:
        pass


@contextmanager
def registered() -> Iterator[None]:
    """The scripted connector is buildable inside the block only, so a test that builds the API
    schema (which lists every registered connector) never sees it, whatever the test order."""
    registry.register(NAME, ScriptedConnector)
    try:
        yield
    finally:
        registry.unregister(NAME)
