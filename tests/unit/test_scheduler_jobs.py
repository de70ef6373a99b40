"""Preheat jobs' state machine and request checks, and the admin API's page arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from starlette.requests import Request
from starlette.responses import Response

from services.piece_scheduler.api import Page
from services.piece_scheduler.config import AdminApiConfig
from services.piece_scheduler.jobs import JOB_FSM, TERMINAL, JobEvent, JobState, PreheatSpec
from shared.errors import InvalidRequest, InvalidStateTransition


def test_a_job_only_ends_once_and_never_moves_after_it_ended() -> None:
    path = [JobEvent.RESOLVE, JobEvent.RESOLVED, JobEvent.COMPLETED]
    state = JobState.PENDING
    for event in path:
        state = JOB_FSM.next_state(state, event)
    assert state is JobState.SUCCEEDED
    for terminal in TERMINAL:
        for event in JobEvent:
            with pytest.raises(InvalidStateTransition):
                JOB_FSM.next_state(terminal, event)
    assert JOB_FSM.next_state(JobState.RESOLVING, JobEvent.FAILED) is JobState.FAILED
    assert JOB_FSM.next_state(JobState.RUNNING, JobEvent.FAILED) is JobState.FAILED
    # A job cannot succeed before its blobs are known.
    assert not JOB_FSM.allows(JobState.RESOLVING, JobEvent.COMPLETED)
    assert not JOB_FSM.allows(JobState.PENDING, JobEvent.RESOLVED)


def test_a_preheat_spec_normalises_the_reference_and_checks_the_platform() -> None:
    assert PreheatSpec.parse("python:3.11", None, None).image == "docker.io/library/python:3.11"
    assert PreheatSpec.parse("127.0.0.1:5000/a/b", "linux/arm64/v8", None).image == "127.0.0.1:5000/a/b:latest"
    with pytest.raises(InvalidRequest, match="not a registry reference"):
        PreheatSpec.parse("oci:/tmp/x:tag", None, None)
    with pytest.raises(InvalidRequest):
        PreheatSpec.parse("127.0.0.1:5000/a:b", "linux", None)
    with pytest.raises(InvalidRequest):
        PreheatSpec.parse("UPPER/case:tag", None, None)


def _page(query: str, max_page_size: int = 1000, **params: int) -> Page:
    app = SimpleNamespace(state=SimpleNamespace(admin_api=AdminApiConfig(max_page_size=max_page_size)))
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/api/v1/peers",
        "query_string": query.encode(),
        "headers": [(b"host", b"scheduler:8002")],
        "scheme": "http",
        "server": ("scheduler", 8002),
        "app": app,
    }
    return Page(Request(scope), **params)


def test_pages_slice_and_link_their_neighbours() -> None:
    items = list(range(7))
    page = _page("page=2&per_page=3", page=2, per_page=3)
    assert page.slice(items) == [3, 4, 5]
    response = Response()
    page.headers(response, len(items))
    assert response.headers["X-Total-Count"] == "7"
    links = dict(
        (part.split("; ")[1].removeprefix('rel="').removesuffix('"'), part.split("; ")[0].strip("<>"))
        for part in response.headers["Link"].split(", ")
    )
    assert set(links) == {"first", "last", "prev", "next"}
    assert links["next"].endswith("page=3&per_page=3") and links["last"].endswith("page=3&per_page=3")
    assert links["prev"].endswith("page=1&per_page=3")
    empty = Response()
    _page("", page=1, per_page=100).headers(empty, 0)
    assert 'rel="next"' not in empty.headers["Link"] and 'rel="prev"' not in empty.headers["Link"]
    with pytest.raises(InvalidRequest, match="over the limit of 10"):
        _page("", max_page_size=10, page=1, per_page=11)
