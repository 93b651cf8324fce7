"""List-then-detail: each page of ids from a search is followed by detail requests in batches."""

from __future__ import annotations

import math
from typing import Any

import pytest

from connectors import registry
from connectors.base import FetchRequest
from errors import ConfigError, UpstreamError
from tests.connectors.support import drain, loopback_connector, records_of
from tests.fakes.videos import VideoApi


def video_config(api: VideoApi, *, page: int, batch: int = 50, pages_per_chunk: int = 10) -> dict[str, Any]:
    return {
        "base_url": api.base_url, "pages_per_chunk": pages_per_chunk,
        "resources": {"videos": {
            "path": "/youtube/v3/search", "params": {"part": "id", "maxResults": page}, "records": "items",
            "paginator": {"type": "cursor", "cursor_param": "pageToken", "cursor_path": "nextPageToken"},
            "primary_key": "id",
            "details": {"path": "/youtube/v3/videos", "params": {"part": "snippet,statistics"}, "ids_param": "id",
                        "batch": batch, "records": "items", "join": "id", "list_id": "id.videoId"},
        }},
    }


@pytest.mark.parametrize(("count", "page"), [(25, 10), (230, 120), (100, 50), (51, 51)])
def test_each_page_is_followed_by_ceil_ids_over_50_detail_requests(count: int, page: int) -> None:
    with VideoApi(count) as api:
        chunks = drain(video_config(api, page=page), "videos")

        records = records_of(chunks)
        assert records == api.records(), "every detail record once, in listing order"
        searches = [e for e in api.requests if e.path == "/youtube/v3/search"]
        details = api.details_requests()
        per_page = [min(page, count - start) for start in range(0, count, page)]
        assert len(searches) == len(per_page)
        assert len(details) == sum(math.ceil(ids / 50) for ids in per_page)
        assert all(len(batch) <= 50 for batch in details)
        assert sum(chunk.requests for chunk in chunks) == len(api.requests)


def test_a_chunk_counts_detail_requests_against_its_budget() -> None:
    with VideoApi(230) as api:
        # A page of 120 ids costs 1 + 3 requests: a budget of 8 holds two pages, not three.
        chunks = drain(video_config(api, page=120, pages_per_chunk=8), "videos")

        assert [chunk.requests for chunk in chunks] == [8]
        assert len(records_of(chunks)) == 230
    with VideoApi(500) as api:
        chunks = drain(video_config(api, page=120, pages_per_chunk=8), "videos")
        assert [chunk.requests for chunk in chunks] == [8, 8, 2]
        assert all(chunk.requests <= 8 for chunk in chunks)
        assert records_of(chunks) == api.records()


def test_ids_without_details_are_skipped(video_api: VideoApi) -> None:
    video_api.deleted = {"vid_000003", "vid_000017"}

    records = records_of(drain(video_config(video_api, page=10), "videos"))

    assert [r["id"] for r in records] == [f"vid_{i:06d}" for i in range(25) if i not in (3, 17)]


def test_a_malformed_details_response_fails_naming_the_path(video_api: VideoApi) -> None:
    video_api.fail_next("malformed", variant="not_list", after=1)
    connector = loopback_connector(video_config(video_api, page=10))
    try:
        with pytest.raises(UpstreamError) as caught:
            connector.fetch(FetchRequest(company_id=1, external_id=None, resource="videos", partition="all"))
    finally:
        connector.close()
    assert "GET /youtube/v3/videos" in str(caught.value) and "records path 'items' is str" in str(caught.value)


def test_a_details_config_without_ids_param_names_the_key(video_api: VideoApi) -> None:
    config = video_config(video_api, page=10)
    del config["resources"]["videos"]["details"]["ids_param"]

    with pytest.raises(ConfigError, match=r"resources\.videos\.details\.ids_param: Field required"):
        registry.validate("rest", config)
