"""``GET /metrics`` (Prometheus text format) and the middleware timing every API request.

``/metrics`` is not behind a key, as Prometheus scrapers expect; it shows counts and timings,
never data. Keep it on an internal network.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline import metrics
from pipeline.api.deps import State

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def get_metrics(state: State) -> Response:
    body = metrics.render(
        [
            metrics.DatabaseCollector(state.runtime.engine),
            metrics.CacheCollector({"objects": state.objects, "bodies": state.bodies}),
        ]
    )
    return Response(body, media_type=metrics.CONTENT_TYPE)


class RequestLatency:
    """Observe each HTTP request's time until its response starts, labelled by route template
    (``/v1/{resource}/{partition}``, never the raw path, so labels stay few)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                metrics.http_request(scope["method"], route, message["status"], time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, timed_send)
