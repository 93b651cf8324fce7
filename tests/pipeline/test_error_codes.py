"""The error codes (``pipeline.error_codes``): properties of the one table, not a copy of it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import connectors.oauth2  # noqa: F401  (its error classes join the tree)
import pipeline.execution  # noqa: F401
from pipeline.error_codes import CODES, TABLE, error_code, explain
from pipeline.errors import PipelineError, UpstreamError

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def chained(outer: Exception, cause: BaseException) -> Exception:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except Exception as exc:
        return exc


def error_tree(root: type[BaseException] = PipelineError) -> list[type[BaseException]]:
    found = [root]
    for sub in root.__subclasses__():
        found.extend(error_tree(sub))
    return found


def bare(cls: type[BaseException]) -> BaseException:
    """An instance of ``cls`` without calling its own constructor (each takes other arguments)."""
    exc = cls.__new__(cls)
    if isinstance(exc, UpstreamError):
        UpstreamError.__init__(exc, "an upstream error")
    elif isinstance(exc, PipelineError):
        PipelineError.__init__(exc, "an error")
    return exc


def test_codes_are_unique() -> None:
    names = [code.name for code in TABLE]
    assert len(names) == len(set(names)) == len(CODES)


def test_every_code_is_explained_in_plain_words_and_documented_in_troubleshooting() -> None:
    guide = GUIDE.read_text()
    for code in TABLE:
        assert code.words and explain(code.name) == code.words
        assert f"`{code.name}`" in guide, f"docs/troubleshooting.md does not document {code.name}"
    assert explain(None) == ""
    assert explain("no_such_code") == "no_such_code"


def test_each_class_in_the_table_gets_its_own_code_even_below_another_listed_class() -> None:
    for code in TABLE:
        for cls in code.raised_as:
            assert error_code(bare(cls)) == code.name, cls.__name__


def test_every_error_class_of_the_tree_maps_to_a_documented_code() -> None:
    classes = error_tree()
    assert len(classes) > 10
    for cls in classes:
        assert error_code(bare(cls)) in CODES, cls.__name__
    assert error_code(KeyError("surprise")) == "internal"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (UpstreamError("HTTP 401: bad token", status=401), "upstream_auth"),
        (UpstreamError("HTTP 403: forbidden", status=403), "upstream_auth"),
        (UpstreamError("HTTP 429 (gave up after 5 attempts)", retryable=True, status=429), "rate_limited"),
        (UpstreamError("HTTP 404: no such page", status=404), "upstream_rejected"),
        (UpstreamError("HTTP 503 (gave up)", retryable=True, status=503), "upstream_unavailable"),
        (UpstreamError("envelope key 'IsSuccess' is missing from the response"), "upstream_malformed"),
        (chained(UpstreamError("GET /x: ReadTimeout", retryable=True), httpx.ReadTimeout("timed out")), "timeout"),
        (chained(PipelineError("the merge stalled"), TimeoutError()), "timeout"),
    ],
)
def test_an_upstream_error_by_its_status_and_any_error_by_a_timeout_among_its_causes(
    exc: BaseException, code: str
) -> None:
    assert error_code(exc) == code
