"""A fake GraphQL API executed by graphql-core (the reference implementation's Python port).

``POST /graphql`` with ``{"query", "variables"}`` (GraphQL over HTTP). The schema::

    type Query {
      jobs(day: String!, first: Int!, after: String, updatedSince: String): JobConnection!
      items(skip: Int = 0, first: Int = 10, updatedSince: String): [Item!]!
    }

``jobs`` is a Relay cursor connection (``edges``/``nodes``/``pageInfo``; opaque base64 cursors;
``first`` at most 100, as GitHub's API enforces); ``items`` pages by offset. Query errors come
back as HTTP 200 with an ``errors`` array, as the spec says. ``fail_next("graphql_errors")``
answers with an error *and* partial data; ``fail_next("throttled")`` with Shopify's
``extensions.code: THROTTLED``; the HTTP faults of ``FakeUpstream`` work too.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import graphql

from connectors.base import Record
from tests.fakes.upstreams import BASE_UPDATED_AT, BadRequest, FakeUpstream, MalformedVariant, Reply, _Fault, iso

SCHEMA = graphql.build_schema("""
type Query {
  jobs(day: String!, first: Int!, after: String, updatedSince: String): JobConnection!
  items(skip: Int = 0, first: Int = 10, updatedSince: String): [Item!]!
}
type JobConnection { nodes: [Job!]!, edges: [JobEdge!]!, pageInfo: PageInfo!, totalCount: Int! }
type JobEdge { cursor: String!, node: Job! }
type PageInfo { hasNextPage: Boolean!, hasPreviousPage: Boolean!, startCursor: String, endCursor: String }
type Job { id: ID!, day: String!, title: String!, updatedAt: String! }
type Item { id: ID!, name: String!, updatedAt: String! }
""")

MAX_FIRST = 100


def _cursor(index: int) -> str:
    return base64.b64encode(f"arrayconnection:{index}".encode()).decode()


def _index(cursor: str) -> int:
    try:
        return int(base64.b64decode(cursor.encode()).decode().removeprefix("arrayconnection:"))
    except ValueError:
        raise graphql.GraphQLError(f"`{cursor}` does not appear to be a valid cursor.") from None



def serve_graphql(schema: graphql.GraphQLSchema, root: dict[str, Any], path: str, body: bytes) -> Reply:
    """One GraphQL-over-HTTP POST to ``/graphql``, executed against ``schema`` with ``root``."""
    if path != "/graphql":
        return Reply(404, {"errors": [{"message": f"No route {path}"}]})
    try:
        request = json.loads(body)
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(request, dict) or not isinstance(request.get("query"), str):
        raise BadRequest("the body must be an object with a 'query' string")
    result = graphql.graphql_sync(schema, request["query"], root_value=root,
                                  variable_values=request.get("variables"), field_resolver=_root_or_default)
    return Reply(200, result.formatted)

class GraphQLApi(FakeUpstream):
    """``count`` jobs per day and ``count`` items."""

    methods: ClassVar[frozenset[str]] = frozenset({"POST"})

    def jobs_of(self, day: str) -> list[Record]:
        base = [{"id": f"job_{day}_{i:05d}", "day": day, "title": f"Job {i}", "updated_at": iso(BASE_UPDATED_AT)}
                for i in range(self.count)]
        return self._apply_changes(base)

    def records(self) -> list[Record]:
        base = [{"id": f"item_{i:05d}", "name": f"Item {i}", "updated_at": iso(BASE_UPDATED_AT)}
                for i in range(self.count)]
        return self._apply_changes(base)

    @staticmethod
    def _public(record: Record) -> Record:
        return {**{k: v for k, v in record.items() if k != "updated_at"}, "updatedAt": record["updated_at"]}

    @staticmethod
    def _since(records: list[Record], since: str | None) -> list[Record]:
        return records if since is None else [r for r in records if r["updated_at"] > since]

    # Root resolvers: graphql-core calls them as ``field(info, **arguments)``.
    def _resolve_jobs(self, info: Any, day: str, first: int, after: str | None = None,
                      updatedSince: str | None = None) -> dict[str, Any]:
        if not 0 <= first <= MAX_FIRST:
            raise graphql.GraphQLError(
                f"Requesting {first} records on the `jobs` connection exceeds the `first` limit of {MAX_FIRST} records."
            )
        records = self._since(self.jobs_of(day), updatedSince)
        start = _index(after) + 1 if after else 0
        page = records[start : start + first]
        edges = [{"cursor": _cursor(start + i), "node": self._public(r)} for i, r in enumerate(page)]
        return {
            "nodes": [edge["node"] for edge in edges],
            "edges": edges,
            "pageInfo": {
                "hasNextPage": start + first < len(records),
                "hasPreviousPage": start > 0,
                "startCursor": edges[0]["cursor"] if edges else None,
                "endCursor": edges[-1]["cursor"] if edges else None,
            },
            "totalCount": len(records),
        }

    def _resolve_items(self, info: Any, skip: int = 0, first: int = 10,
                       updatedSince: str | None = None) -> list[Record]:
        if first > MAX_FIRST or first < 0 or skip < 0:
            raise graphql.GraphQLError(f"first must be between 0 and {MAX_FIRST} and skip at least 0")
        return [self._public(r) for r in self._since(self.records(), updatedSince)[skip : skip + first]]

    def handle(self, method: str, path: str, params: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
        return serve_graphql(SCHEMA, {"jobs": self._resolve_jobs, "items": self._resolve_items}, path, body)

    def _fault_reply(self, fault: _Fault) -> Reply:
        if fault.kind == "graphql_errors":
            partial = {"jobs": {"nodes": [{"id": "job_partial", "title": "partial"}], "pageInfo": None}}
            error = {"message": fault.message, "locations": [{"line": 1, "column": 3}], "path": ["jobs"]}
            return Reply(200, {"data": partial, "errors": [error]})
        if fault.kind == "throttled":
            error = {"message": "Throttled", "extensions": {"code": "THROTTLED", "documentation": "…/rate-limits"}}
            return Reply(200, {"errors": [error]})
        return super()._fault_reply(fault)

    def _error_body(self, status: int, message: str) -> Any:
        return {"errors": [{"message": message}]}

    def _malformed_body(self, variant: MalformedVariant) -> Any:
        if variant == "not_list":
            return {"data": {"jobs": {"nodes": "unavailable", "pageInfo": {"hasNextPage": False}},
                             "items": "unavailable"}}
        return {"data": {}}


def _root_or_default(source: Any, info: graphql.GraphQLResolveInfo, **args: Any) -> Any:
    # The root value is a dict of resolvers; below it, records are plain dicts.
    if info.parent_type.name == "Query":
        return source[info.field_name](info, **args)
    return graphql.default_field_resolver(source, info, **args)


PAGES_SCHEMA = graphql.build_schema("""
type Query { pages(first: Int!, after: String): PageConnection! }
type PageConnection { nodes: [PageRecord!]!, pageInfo: PageInfo! }
type PageInfo { hasNextPage: Boolean!, endCursor: String }
type PageRecord { id: Int!, p: Int!, v: Int! }
""")


class PagesApi(FakeUpstream):
    """A GraphQL Relay connection serving fixed pages: ``pages(first, after)`` answers page
    ``p`` of ``source()`` (``after`` is the cursor ``"p<p-1>"``; none for page 0), whatever
    its size (``first`` is accepted, as the relay paginator sends it, but the page boundaries
    are the source's). Model-based tests set ``source`` to what the upstream serves now."""

    methods: ClassVar[frozenset[str]] = frozenset({"POST"})

    def __init__(self) -> None:
        super().__init__(0)
        self.source: Callable[[], Sequence[list[Record]]] = lambda: [[]]

    def _resolve_pages(self, info: Any, first: int, after: str | None = None) -> dict[str, Any]:
        page = 0
        if after is not None:
            if not after.startswith("p") or not after[1:].isdigit():
                raise graphql.GraphQLError(f"`{after}` does not appear to be a valid cursor.")
            page = int(after[1:]) + 1
        pages = self.source()
        if page >= len(pages):
            raise graphql.GraphQLError(f"cursor `{after}` is past the last page ({len(pages)} pages)")
        return {"nodes": list(pages[page]),
                "pageInfo": {"hasNextPage": page + 1 < len(pages), "endCursor": f"p{page}"}}

    def handle(self, method: str, path: str, params: dict[str, str], body: bytes, headers: dict[str, str]) -> Reply:
        return serve_graphql(PAGES_SCHEMA, {"pages": self._resolve_pages}, path, body)


PAGES_QUERY = ("query($first: Int!, $after: String) "
               "{ pages(first: $first, after: $after) { nodes { id p v } pageInfo { hasNextPage endCursor } } }")


def pages_config(api: PagesApi, resource: str) -> dict[str, Any]:
    """A ``graphql`` connector config reading ``api``'s pages as ``resource``, one page per chunk."""
    return {"endpoint": f"{api.base_url}/graphql", "pages_per_chunk": 1,
            "resources": {resource: {"query": PAGES_QUERY, "records": "data.pages.nodes", "primary_key": "id",
                                     "paginator": {"type": "relay", "page_info": "data.pages.pageInfo"},
                                     "transform": "identity"}}}
