"""A node's download state: fetched pieces handed to range readers from memory while they are stored."""

from __future__ import annotations

import asyncio

from services.registry_proxy.downloader import FRESH_PIECE_MAX, BlobRequest, TaskDownload
from services.registry_proxy.metrics import ServedFrom
from shared.tasks import sha256_digest

PIECE = bytes(range(256)) * 1024  # 256 KiB


def _download(*, range_reader: bool) -> TaskDownload:
    request = BlobRequest(
        task_id="a" * 64, url="http://origin/v2/r/blobs/sha256:" + "b" * 64, digest=None, authorization=None
    )
    download = TaskDownload(request=request, layout=asyncio.get_running_loop().create_future())
    download.wanted = set() if range_reader else None
    return download


async def test_a_piece_matching_its_digest_is_handed_to_range_readers_until_it_is_stored() -> None:
    download = _download(range_reader=True)
    assert download.hand_over(3, memoryview(PIECE), sha256_digest(PIECE), ServedFrom.ORIGIN)
    assert download.fresh[3] == PIECE and download.event(3).is_set()
    assert download.sources[3] is ServedFrom.ORIGIN
    download.held.add(3)  # Stored: the event stays set for the readers still to come.
    download.take_back(3)
    assert 3 not in download.fresh and download.event(3).is_set()


async def test_a_piece_that_could_not_be_stored_is_taken_back_and_readers_wait_again() -> None:
    download = _download(range_reader=True)
    assert download.hand_over(3, PIECE, sha256_digest(PIECE), ServedFrom.PEER)
    download.take_back(3)
    assert 3 not in download.fresh and not download.event(3).is_set()


async def test_nothing_unchecked_or_unsuited_is_handed_over() -> None:
    download = _download(range_reader=True)
    corrupt = b"\xff" + PIECE[1:]  # PIECE starts with 0x00
    assert not download.hand_over(1, corrupt, sha256_digest(PIECE), ServedFrom.PEER)
    assert not download.hand_over(2, PIECE, "blake3:" + "c" * 64, ServedFrom.PEER)  # Not a digest checked here.
    big = bytes(FRESH_PIECE_MAX + 1)
    assert not download.hand_over(4, big, sha256_digest(big), ServedFrom.PEER)
    whole = _download(range_reader=False)  # A whole-blob puller streams from disk, in big pieces.
    assert not whole.hand_over(0, PIECE, sha256_digest(PIECE), ServedFrom.PEER)
    assert not download.fresh and not whole.fresh
    assert not any(event.is_set() for event in (*download.ready.values(), *whole.ready.values()))
