"""Task ids, piece sizes and ranges, HTTP Range parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import InvalidRequest, RangeNotSatisfiable
from shared.tasks import (
    MIB,
    RANGED_MAX_PIECES,
    RANGED_PIECE_SIZE,
    blob_digest_in,
    check_piece_size,
    filtered_url,
    parse_filter,
    parse_range_header,
    piece_count,
    piece_range,
    piece_size_for,
    pieces_covering,
    ranged_piece_size_for,
    task_id_for_digest,
    task_id_for_url,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("length", "size"),
    [
        (0, 1 * MIB),
        (1, 1 * MIB),
        (64 * MIB, 1 * MIB),
        (64 * MIB + 1, 4 * MIB),
        (200 * MIB, 4 * MIB),
        (200 * MIB + 1, 7 * MIB),
        (512 * MIB, 10 * MIB),
        (1024 * MIB, 15 * MIB),
        (100 * 1024 * MIB, 15 * MIB),
    ],
)
def test_piece_size_is_small_for_small_blobs_then_follows_dragonflys_rule(length: int, size: int) -> None:
    assert piece_size_for(length) == size


@given(st.integers(min_value=0, max_value=10**12))
def test_pieces_tile_the_blob_exactly(length: int) -> None:
    size = piece_size_for(length)
    count = piece_count(length, size)
    if count:
        first, last = piece_range(0, length, size), piece_range(count - 1, length, size)
        assert first.start == 0 and last.end == length
        assert 0 < last.length <= size
    assert count * size >= length > (count - 1) * size or length == 0


@given(st.integers(min_value=1, max_value=10**9), st.data())
def test_pieces_covering_a_range_hold_every_byte_of_it(length: int, data: st.DataObject) -> None:
    size = piece_size_for(length)
    start = data.draw(st.integers(min_value=0, max_value=length - 1))
    end = data.draw(st.integers(min_value=start, max_value=length - 1))
    numbers = pieces_covering(start, end, size)
    assert piece_range(numbers[0], length, size).start <= start
    assert piece_range(numbers[-1], length, size).end > end


def test_piece_out_of_range_is_invalid() -> None:
    with pytest.raises(InvalidRequest):
        piece_range(3, 10, 4)


@pytest.mark.parametrize(
    ("header", "length", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=2-", 10, (2, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=5-100", 10, (5, 9)),
        ("bytes=-100", 10, (0, 9)),
        (" bytes=1-2 ", 10, (1, 2)),
    ],
)
def test_valid_ranges(header: str | None, length: int, expected: tuple[int, int] | None) -> None:
    assert parse_range_header(header, length) == expected


@pytest.mark.parametrize(
    ("header", "length"),
    [
        ("bytes=10-", 10),
        ("bytes=5-2", 10),
        ("bytes=-0", 10),
        ("items=0-1", 10),
        ("bytes=a-b", 10),
        ("bytes=0-0", 0),
        ("bytes=-1", 0),
        ("bytes", 10),
    ],
)
def test_unsatisfiable_ranges_are_416(header: str, length: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range_header(header, length)


def test_multiple_ranges_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        parse_range_header("bytes=0-1,3-4", 10)


def test_filtered_parameters_do_not_change_the_task_id() -> None:
    filters = parse_filter("Expires&Signature&ns")
    assert filters == ("Expires", "Signature", "ns")
    one = task_id_for_url("https://cdn.example/blob?b=2&Signature=x&a=1&Expires=1", filters)
    two = task_id_for_url("https://cdn.example/blob?a=1&Expires=9&b=2&Signature=y", filters)
    other = task_id_for_url("https://cdn.example/blob?a=2&b=2", filters)
    assert one == two != other
    assert filtered_url("https://h/p?ns=docker.io&x=1", filters) == "https://h/p?x=1"


def test_digest_task_ids_and_blob_paths() -> None:
    assert task_id_for_digest(DIGEST) == task_id_for_digest(DIGEST)
    assert len(task_id_for_digest(DIGEST)) == 64
    with pytest.raises(InvalidRequest):
        task_id_for_digest("md5:abc")
    assert blob_digest_in(f"/v2/library/python/blobs/{DIGEST}") == DIGEST
    assert blob_digest_in("/v2/library/python/manifests/3.11") is None


def test_the_seed_fetches_awaited_pieces_first_then_the_rest_in_order() -> None:
    from services.seed_fetcher.fetcher import PieceQueue

    queue = PieceQueue(range(6))
    assert queue.next() == 0
    queue.prioritize([4, 0, 2])  # 0 is under way already: skipped.
    assert [queue.next() for _ in range(5)] == [4, 2, 1, 3, 5]
    assert queue.next() is None
    queue.prioritize([1])
    assert queue.next() is None


def test_the_seed_takes_consecutive_pending_pieces_as_one_run() -> None:
    from services.seed_fetcher.fetcher import PieceQueue

    queue = PieceQueue([2, 3, 4, 5, 6, 9, 10])
    queue.prioritize([9])
    assert queue.next_run(4) == [9, 10]  # An awaited piece first, with what follows it.
    assert queue.next_run(4) == [2, 3, 4, 5]  # At most the limit.
    queue.prioritize([6])
    assert queue.next_run(1) == [6]
    assert queue.next_run(4) == []
    queue.add([7, 8, 11])
    assert queue.next_run(4) == [7, 8]  # 9 and 10 were fetched: the run stops before them.
    assert queue.next_run(4) == [11]


def test_an_on_demand_queue_takes_new_pieces_once_each() -> None:
    from services.seed_fetcher.fetcher import PieceQueue

    queue = PieceQueue([7, 3], known=[1])  # 1 is held already.
    assert queue.add([3, 1, 9, 2]) == 2  # 3 is queued, 1 held: only 9 and 2 are new.
    assert [queue.next() for _ in range(4)] == [2, 3, 7, 9]
    assert queue.add([2, 9]) == 0 and queue.next() is None  # Fetched ones never come back.
    queue.add([5])
    queue.prioritize([5])
    assert queue.next() == 5


@pytest.mark.parametrize(
    ("length", "size"),
    [
        (0, RANGED_PIECE_SIZE),
        (51 * MIB, RANGED_PIECE_SIZE),
        (1024 * MIB, RANGED_PIECE_SIZE),  # 4096 pieces: the limit.
        (1024 * MIB + 1, 2 * RANGED_PIECE_SIZE),
        (100 * 1024 * MIB, 15 * MIB),  # Never above what a whole-blob reader would use.
    ],
)
def test_range_readers_propose_small_pieces_with_a_bounded_count(length: int, size: int) -> None:
    assert ranged_piece_size_for(length) == size
    assert ranged_piece_size_for(length) <= piece_size_for(length)


@given(st.integers(min_value=0, max_value=1 << 40))
def test_a_ranged_layout_is_valid_and_never_has_too_many_pieces(length: int) -> None:
    size = ranged_piece_size_for(length)
    assert check_piece_size(size) == size
    assert piece_count(length, size) <= RANGED_MAX_PIECES or size == piece_size_for(length)


@pytest.mark.parametrize("size", [0, 1000, 64 * 1024 - 1, 64 * 1024 + 1, 16 * MIB, -65536])
def test_invalid_piece_sizes_are_refused_with_the_rule(size: int) -> None:
    with pytest.raises(InvalidRequest, match="multiple of 65536"):
        check_piece_size(size)


@pytest.mark.parametrize(
    ("proposed", "length", "size"),
    [
        (None, 51 * MIB, 1 * MIB),  # No proposal: the usual rule.
        (RANGED_PIECE_SIZE, 51 * MIB, RANGED_PIECE_SIZE),  # A range reader's proposal.
        (2 * MIB, 51 * MIB, 2 * MIB),  # Larger pieces are fewer: taken as proposed.
        (64 * 1024, 4 * 1024 * MIB, 1 * MIB),  # Too small for the blob: raised to 4096 pieces' worth.
        (64 * 1024, 100 * 1024 * MIB, 15 * MIB),
    ],
)
def test_the_scheduler_takes_a_proposed_piece_size_but_never_more_pieces_than_the_ranged_rule(
    proposed: int | None, length: int, size: int
) -> None:
    from services.piece_scheduler.assignment import AssignmentService
    from shared.schemas import AssignmentRequest

    request = AssignmentRequest(task_id="ab" * 32, peer_id="p", url="u", content_length=length, piece_size=proposed)
    layout = AssignmentService._layout(None, request)
    assert layout is not None
    assert layout.piece_size == size
    assert layout.piece_count <= max(RANGED_MAX_PIECES, piece_count(length, piece_size_for(length)))
