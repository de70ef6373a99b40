"""The P2P timeline's report: each blob read with the hops before its origin request and its pieces."""

from __future__ import annotations

from bench.p2p_timeline import BLOB_ROUTE, Span, report

MS = 1_000_000


def test_each_read_shows_the_time_to_the_origin_and_its_piece_downloads() -> None:
    t0 = 1_000 * MS
    spans = [
        Span(t0 + 10 * MS, t0 + 90 * MS, "registry_proxy", BLOB_ROUTE, ""),
        Span(t0 + 12 * MS, t0 + 14 * MS, "registry_proxy", "request assignment.request", ""),
        Span(t0 + 16 * MS, t0 + 20 * MS, "seed_fetcher", "GET", "http://origin/v2/r/blobs/sha256:ab"),
        Span(t0 + 40 * MS, t0 + 45 * MS, "registry_proxy", "GET", "http://seed/download/t/pieces/3"),
        Span(t0 + 60 * MS, t0 + 70 * MS, "registry_proxy", "GET", "http://seed/download/t/pieces/4"),
        # A read served by the node itself: no origin request, no download.
        Span(t0 + 100 * MS, t0 + 103 * MS, "registry_proxy", BLOB_ROUTE, ""),
        # Outside the run: left out.
        Span(t0 + 500 * MS, t0 + 600 * MS, "registry_proxy", BLOB_ROUTE, ""),
    ]
    lines = report(spans, t0, t0 + 200 * MS)
    assert lines[1].split() == ["10.0", "80.0", "6.0", "35", "60"]
    assert lines[2].split() == ["100.0", "3.0"]
    assert "2 blob reads through the proxy: 83 ms" in lines[-2]
    assert lines[-1].startswith("reads that went to the origin: 1;") and "median 6.0 ms" in lines[-1]
