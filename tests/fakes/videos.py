"""A fake search-then-details API shaped like the YouTube Data API v3.

- ``GET /youtube/v3/search?part=id&channelId=…&maxResults=n&pageToken=t``: ``items`` of
  ``{"kind": "youtube#searchResult", "id": {"kind": "youtube#video", "videoId": …}}`` and a
  ``nextPageToken`` while more follow. YouTube caps ``maxResults`` at 50; this fake allows up
  to ``search_cap`` so that a page can need several detail batches.
- ``GET /youtube/v3/videos?part=snippet,statistics&id=a,b,…``: the details of at most 50 ids
  (more is a 400, as YouTube answers); unknown ids are left out, as YouTube does.
"""

from __future__ import annotations

import base64
from typing import Any

from connectors.base import Record
from tests.fakes.upstreams import BadRequest, MalformedVariant, Reply, _ListApi

MAX_IDS = 50


class VideoApi(_ListApi):
    """``count`` videos; ``deleted`` ids are listed by search but have no details."""

    def __init__(self, count: int = 25, *, search_cap: int = 500) -> None:
        super().__init__(count)
        self.search_cap = search_cap
        self.deleted: set[str] = set()

    def make_record(self, index: int) -> Record:
        return {
            "kind": "youtube#video",
            "id": f"vid_{index:06d}",
            "snippet": {"title": f"Video {index}", "channelId": "UC_fake"},
            "statistics": {"viewCount": str(index * 10)},
        }

    def details_requests(self) -> list[list[str]]:
        """The ids asked for by each ``/videos`` request, in order."""
        return [entry.params["id"].split(",") for entry in self.requests if entry.path == "/youtube/v3/videos"]

    def route(self, path: str, params: dict[str, str]) -> Reply:
        if path == "/youtube/v3/search":
            return self._search(params)
        if path == "/youtube/v3/videos":
            return self._videos(params)
        return Reply(404, self._error_body(404, "Not Found"))

    def _search(self, params: dict[str, str]) -> Reply:
        size = self._int_param(params, "maxResults", 5, 0, self.search_cap)
        offset = 0
        if "pageToken" in params:
            try:
                offset = int(base64.urlsafe_b64decode(params["pageToken"].encode()).decode())
            except ValueError:
                raise BadRequest(f"Invalid page token {params['pageToken']!r}") from None
        videos = self.records()[offset : offset + size]
        items = [{"kind": "youtube#searchResult", "id": {"kind": "youtube#video", "videoId": v["id"]}}
                 for v in videos]
        body: dict[str, Any] = {"kind": "youtube#searchListResponse", "items": items,
                                "pageInfo": {"totalResults": self.count, "resultsPerPage": size}}
        if offset + size < self.count:
            body["nextPageToken"] = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
        return Reply(200, body)

    def _videos(self, params: dict[str, str]) -> Reply:
        ids = [item for item in params.get("id", "").split(",") if item]
        if not ids:
            raise BadRequest("No filter selected. Expected one of: id, chart, myRating")
        if len(ids) > MAX_IDS:
            raise BadRequest(f"The request specifies {len(ids)} ids; at most {MAX_IDS} are allowed")
        by_id = {video["id"]: video for video in self.records() if video["id"] not in self.deleted}
        return Reply(200, {"kind": "youtube#videoListResponse", "items": [by_id[i] for i in ids if i in by_id]})

    def _error_body(self, status: int, message: str) -> Any:
        return {"error": {"code": status, "message": message, "errors": [{"message": message}]}}

    def _malformed_body(self, variant: MalformedVariant) -> Any:
        return {"kind": "youtube#videoListResponse", "items": "unavailable" if variant == "not_list" else None}
