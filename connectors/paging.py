"""The page loop every declarative connector shares: pages of one partition, bounded per chunk.

A connector supplies ``fetch_page(state, deadline)`` (send the request(s) of one page, read its
records, return them with the state after the page and whether more pages follow); this loop
decides how many pages make one chunk and what a failure part-way through a chunk means.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from connectors.base import Chunk, FetchState, Record
from errors import FailureKind, PipelineError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PageResult:
    """One page: its records, the state to resume from after it, and whether another page follows."""

    records: list[Record]
    state: FetchState
    more: bool


FetchPage = Callable[[FetchState, float | None], PageResult]


def fetch_chunk(
    fetch_page: FetchPage,
    state: FetchState,
    *,
    max_pages: int,
    deadline: float | None,
    requests_sent: Callable[[], int],
    max_requests: int | None = None,
    label: str = "",
    scrub: Callable[[str], str] | None = None,
) -> Chunk:
    """Fetch up to ``max_pages`` pages starting from ``state``.

    Stops early, after at least one page, when another page of the slowest duration seen so far
    would end past ``deadline``, or (with ``max_requests``) when another page of the most requests
    seen so far would send more than ``max_requests`` requests in this chunk. A retryable
    failure after at least one page ends the chunk instead of raising, so the pages already
    read are kept; if it persists, the next call raises. Retryable means ``FailureKind.RETRYABLE``
    (``errors``): an ``UpstreamError`` with ``retryable``, a ``DeadlineExceeded``.

    Parameters:
        requests_sent: the connector's running count of requests sent (retries included).
        scrub: takes credentials out of a message before it is logged.

    Raises:
        UpstreamError: whatever ``fetch_page`` raised on the first page, or a non-retryable
            error on any page (likewise any other ``PipelineError``).
    """
    records: list[Record] = []
    sent_before = requests_sent()
    slowest = 0.0
    most_requests = 0
    done = False
    for page_number in range(max_pages):
        if page_number:
            if deadline is not None and time.monotonic() + slowest > deadline:
                break
            if max_requests is not None and requests_sent() - sent_before + most_requests > max_requests:
                break
        started, sent_at_start = time.monotonic(), requests_sent()
        try:
            page = fetch_page(state, deadline)
        except PipelineError as exc:
            # e.g. retries ran out, or a rate-limit slot lies past the lease (DeadlineExceeded).
            if exc.kind is FailureKind.RETRYABLE and page_number:
                logger.warning("%s: ending the chunk after %d pages: %s", label, page_number,
                               scrub(str(exc)) if scrub is not None else exc)
                break
            raise
        slowest = max(slowest, time.monotonic() - started)
        most_requests = max(most_requests, requests_sent() - sent_at_start)
        records.extend(page.records)
        state = page.state
        if not page.more:
            done = True
            break
    return Chunk(records=records, state=state, done=done, requests=requests_sent() - sent_before)
