"""Bounds on what one request can make this process hold: its body, and the live event streams.

``BodyLimit`` answers 413 (our JSON error body) to a request whose body is larger than
``PIPELINE_API_MAX_BODY_BYTES``: at once when ``Content-Length`` says so, otherwise as soon as the
bytes read pass the cap (a chunked body), without buffering more than the cap.

``StreamSlots`` counts the Server-Sent Event streams open in this process; past
``PIPELINE_API_MAX_EVENT_STREAMS`` a new stream is refused with 503 and ``Retry-After``, since
each open stream holds a connection, a queue on the event feed and a task.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.api.errors import error_response

RETRY_AFTER_S = 5


def body_too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (PIPELINE_API_MAX_BODY_BYTES)"


class BodyLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413.

    A declared ``Content-Length`` over the cap is answered before the app runs. A body without
    one is counted as it is read; passing the cap raises ``HTTPException(413)`` from ``receive``,
    which FastAPI re-raises from its body parsing (it re-raises a middleware's HTTPException) and
    the app's handler renders.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = error_response(413, "body_too_large", body_too_large(self.max_bytes))
            await response(scope, receive, send)
            return
        total = 0

        async def limited_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise HTTPException(413, body_too_large(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class StreamsExhausted(Exception):
    """Every event-stream slot of this process is taken."""


class StreamSlots:
    """A counter of open event streams, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return self._open

    def acquire(self) -> Callable[[], None]:
        """Take a slot; returns the function that gives it back (idempotent).

        Raises:
            StreamsExhausted: ``limit`` streams are open.
        """
        with self._lock:
            if self._open >= self.limit:
                raise StreamsExhausted(f"{self.limit} event streams are open (PIPELINE_API_MAX_EVENT_STREAMS)")
            self._open += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._open -= 1

        return release


def streams_exhausted(exc: StreamsExhausted) -> Response:
    return error_response(
        503, "too_many_streams", f"{exc}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


class SlotStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that gives its stream slot back however the response ends
    (finished, client gone before the first byte, cancelled)."""

    def __init__(
        self,
        content: AsyncIterable[bytes] | Iterable[bytes],
        *,
        release: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
