"""The peer side of P2P: get a task's pieces from the parents the scheduler names, into this node's store.

One :class:`TaskDownload` per task per node, however many clients ask for the blob at once. It asks the
scheduler for assignments (NATS request/reply), fetches pieces from parents' upload servers with a few
in flight, lowest wanted number first, checks each against its digest while storing it (one copy on
disk, in the store the node's cache-store serves from), announces it at once, and wakes the readers
streaming that piece to clients. A range reader (a lazy mount) is handed a small piece from memory as
soon as its bytes match the assigned digest, while it is being written: the store's write and a read
back are off the path of the read that waits for it. A parent that fails or serves a corrupt piece is reported
(``piece.failed``) and the next parent is tried; when none is left the scheduler is asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from services.registry_proxy.metrics import ParentKind, ProxyMetrics, ServedFrom
from shared import subjects
from shared.bus import Bus
from shared.errors import DamselflyError, DependencyUnavailable, DigestMismatch, UpstreamError
from shared.piece_store import OpenPiece, PieceStore, StoredTask
from shared.ratelimit import TokenBucket
from shared.schemas import (
    AssignmentReply,
    AssignmentRequest,
    ParentCandidate,
    PieceAnnounced,
    PieceAssignment,
    PieceFailed,
    PieceFailureReason,
    PieceSource,
    TaskStatus,
)
from shared.tasks import piece_range, pieces_covering, ranged_piece_size_for, sha256_digest

logger = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
# Consecutive pieces from one parent are fetched with one range request of at most this many bytes.
RUN_BYTES = 1024 * 1024
LAYOUT_TIMEOUT_SECONDS = 120.0
# Pieces up to this size are handed to waiting range readers from memory while they are stored.
FRESH_PIECE_MAX = 1024 * 1024
# A partial download (no prefetch) waits this long for more ranges before it lets go of its state.
IDLE_DOWNLOAD_SECONDS = 60.0


@dataclass
class BlobRequest:
    """What a client asked for."""

    task_id: str
    url: str
    digest: str | None
    authorization: str | None
    content_length: int | None = None
    # The piece size proposed to the scheduler while the task is not registered (set by open()).
    piece_size: int | None = None


@dataclass
class TaskDownload:
    """The state of one task's download on this node."""

    request: BlobRequest
    layout: asyncio.Future[StoredTask]
    ready: dict[int, asyncio.Event] = field(default_factory=dict)
    urgent: list[int] = field(default_factory=list)
    wanted: set[int] | None = None  # None: every piece.
    assignments: dict[int, PieceAssignment] = field(default_factory=dict)
    fetching: set[int] = field(default_factory=set)
    held: set[int] = field(default_factory=set)
    # Pieces fetched and checked against their digest, not yet on disk: readers serve them from memory
    # while they are being stored (a lazy reader waits for exactly these bytes).
    fresh: dict[int, bytes] = field(default_factory=dict)
    failure: DamselflyError | None = None
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None
    bytes_from_peers: int = 0
    # This download's request is the one that sent the task to the seed: what the seed sends is origin's.
    seed_requested: bool = False
    # Ask the scheduler at once, not after the last reply's retry delay: a reader wants new pieces, or a
    # piece it lacks was announced. The delay is for asking again about the same missing pieces.
    ask_now: bool = False
    sources: dict[int, ServedFrom] = field(default_factory=dict)  # Pieces fetched by this download.

    def hand_over(self, number: int, data: bytes | memoryview, digest: str, source: ServedFrom) -> bool:
        """Let range readers have a fetched piece from memory while it is being stored, if its bytes match
        ``digest`` (checked here, so the store need not hash them again). True if handed over.

        Only for range readers, only small pieces (their layout) and only sha256 digests (what holders
        announce): hashing one on the event loop costs well under a millisecond."""
        if self.wanted is None or len(data) > FRESH_PIECE_MAX or not digest.startswith("sha256:"):
            return False
        if sha256_digest(data) != digest:
            return False  # The store will refuse it, and the piece is reported.
        self.sources[number] = source
        self.fresh[number] = bytes(data)
        self.event(number).set()
        return True

    def take_back(self, number: int) -> None:
        """The piece is on disk now, or could not be stored: readers no longer take it from memory."""
        if self.fresh.pop(number, None) is not None and number not in self.held:
            self.event(number).clear()

    def event(self, number: int) -> asyncio.Event:
        """The event set when piece ``number`` is on disk, or handed over from memory (see ``fresh``)."""
        return self.ready.setdefault(number, asyncio.Event())

    def want(self, numbers: range, prefetch_rest: bool) -> None:
        """Make ``numbers`` the next pieces to fetch; without prefetch, fetch only what is asked for."""
        new = [number for number in numbers if number not in self.held]
        self.ask_now = self.ask_now or any(number not in self.assignments for number in new)
        self.urgent = new + self.urgent
        if prefetch_rest:
            self.wanted = None
        elif self.wanted is not None:
            self.wanted.update(numbers)
        self.wakeup.set()


class PeerDownloader:
    """Downloads tasks for this node's clients (registry-proxy requests) through the P2P network."""

    def __init__(
        self,
        *,
        peer_id: str,
        store: PieceStore,
        bus: Bus,
        session: aiohttp.ClientSession,
        parallel_pieces: int = 4,
        piece_timeout: float = 30.0,
        metrics: ProxyMetrics,
        assignment_timeout: float = 5.0,
        rate_limit: TokenBucket | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.store = store
        self.bus = bus
        self.session = session
        self.parallel_pieces = parallel_pieces
        self.piece_timeout = piece_timeout
        self.assignment_timeout = assignment_timeout
        self.rate_limit = rate_limit
        self.metrics = metrics
        self._downloads: dict[str, TaskDownload] = {}
        # Parents seen in assignments, by peer id: where to fetch a piece its holder has just announced.
        self._parents: dict[str, ParentCandidate] = {}
        self._announcing: set[asyncio.Task[None]] = set()
        metrics.downloads_in_progress.set_function(
            lambda: sum(1 for download in self._downloads.values() if download.failure is None)
        )

    # --- entry points used by the routes -----------------------------------------------------------

    async def stored_task(self, task_id: str) -> StoredTask | None:
        """The task as this node's store has it, if at all."""
        return await asyncio.to_thread(self.store.get_task, task_id)

    async def open(
        self, request: BlobRequest, first: int = 0, last: int | None = None, prefetch: bool = True
    ) -> tuple[TaskDownload | None, StoredTask]:
        """Start (or join) the task's download and wait for its layout.

        Returns ``(None, task)`` when the store already holds the whole task.
        """
        download = self._downloads.get(request.task_id)
        if download is None or download.failure is not None:
            # No download under way (one that completes the task ends itself): the store may hold it all.
            task = await asyncio.to_thread(self.store.get_task, request.task_id)
            if task is not None and task.completed:
                await asyncio.to_thread(self.store.touch, request.task_id)
                return None, task
            download = self._downloads.get(request.task_id)  # Another request may have started one meanwhile.
        if download is None or download.failure is not None:
            download = TaskDownload(request=request, layout=asyncio.get_running_loop().create_future())
            download.wanted = None if prefetch else set()
            self._downloads[request.task_id] = download
            download.runner = asyncio.create_task(self._run(download), name=f"download-{request.task_id[:12]}")
        if not download.layout.done() and not prefetch and request.content_length:
            # A range reader proposes small pieces (the task's first requester decides its layout, later
            # ones get what was registered) and names the pieces it needs in the first request, so the
            # seed fetches those, not the whole blob. Should another layout win, open() names them again
            # below, from the registered layout.
            size = download.request.piece_size or ranged_piece_size_for(request.content_length)
            download.request.piece_size = size
            end = request.content_length - 1 if last is None else min(last, request.content_length - 1)
            download.want(pieces_covering(first, end, size), prefetch_rest=False)
        try:
            task = await asyncio.wait_for(asyncio.shield(download.layout), LAYOUT_TIMEOUT_SECONDS)
        except TimeoutError as exc:
            raise DependencyUnavailable(
                f"no layout for task {request.task_id} after {LAYOUT_TIMEOUT_SECONDS}s"
            ) from exc
        end = task.content_length - 1 if last is None else last
        if task.content_length:
            download.want(pieces_covering(first, end, task.piece_size), prefetch_rest=prefetch)
        return download, task

    async def stream(
        self, download: TaskDownload | None, task: StoredTask, first: int, last: int
    ) -> AsyncIterator[bytes]:
        """The bytes ``first..last`` of the task, in order, each piece as soon as it is on disk.

        Consecutive pieces already on disk are read through one open descriptor: a lazy reader's range
        spans several small pieces, and a file open, a check and a thread hop per piece add up.
        """
        if task.content_length == 0:
            return
        numbers = list(pieces_covering(first, last, task.piece_size))
        index = 0
        while index < len(numbers):
            number = numbers[index]
            if download is not None:
                await self._wait_for_piece(download, number)
                fresh = download.fresh.get(number)
                if fresh is not None:
                    piece = piece_range(number, task.content_length, task.piece_size)
                    part = fresh[max(first, piece.start) - piece.start : min(last, piece.end - 1) - piece.start + 1]
                    yield part
                    self.metrics.served_bytes.labels(source=self._source(download, number).value).inc(len(part))
                    index += 1
                    continue
            # Extend the run over the following pieces that are on disk too, from the same source.
            source = self._source(download, number)
            run_end = index + 1
            while (
                run_end < len(numbers)
                and (download is None or numbers[run_end] in download.held)
                and self._source(download, numbers[run_end]) is source
            ):
                run_end += 1
            start = max(first, piece_range(number, task.content_length, task.piece_size).start)
            end = min(last, piece_range(numbers[run_end - 1], task.content_length, task.piece_size).end - 1)
            served = self.metrics.served_bytes.labels(source=source.value)
            opened = await asyncio.to_thread(self.store.open_range, task.task_id, start, end)
            async for chunk in _read_open(opened):
                yield chunk
                served.inc(len(chunk))
            index = run_end

    @staticmethod
    def _source(download: TaskDownload | None, number: int) -> ServedFrom:
        # A piece this download did not fetch was on disk before it started.
        return download.sources.get(number, ServedFrom.LOCAL) if download is not None else ServedFrom.LOCAL

    async def _wait_for_piece(self, download: TaskDownload, number: int) -> None:
        event = download.event(number)
        while number not in download.held and number not in download.fresh:
            if download.failure is not None:
                raise download.failure
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 1.0)

    def _announce_soon(self, event: PieceAnnounced) -> None:
        """Publish ``event`` without waiting for it (close() waits for what is still being published)."""
        task = asyncio.create_task(self._publish(event), name=f"announce-{event.task_id[:12]}-{event.piece_number}")
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def close(self) -> None:
        """Stop every download (their pieces on disk stay) and finish publishing announcements."""
        await asyncio.gather(*self._announcing, return_exceptions=True)
        for download in list(self._downloads.values()):
            if download.runner is not None:
                download.runner.cancel()
        for download in list(self._downloads.values()):
            if download.runner is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await download.runner

    # --- the download loop ------------------------------------------------------------------------

    async def _run(self, download: TaskDownload) -> None:
        task_id = download.request.task_id

        async def on_announced(event: PieceAnnounced) -> None:
            # A piece this download waits for got a holder. A holder we know the address of (from an
            # earlier assignment) is asked straight away, as Dragonfly peers sync pieces from their
            # parents; the piece's digest is checked on arrival all the same. Otherwise ask the scheduler
            # now rather than at the next poll.
            number = event.piece_number
            if event.holder == self.peer_id or number in download.held or number in download.assignments:
                return
            wanted = download.wanted is None or number in download.wanted or number in download.urgent
            known = self._parents.get(event.holder)
            if wanted and known is not None:
                download.assignments[number] = PieceAssignment(
                    piece_number=number,
                    range_start=event.range_start,
                    range_length=event.range_length,
                    digest=event.digest,
                    parents=[known],
                )
            else:
                download.ask_now = True
            download.wakeup.set()

        try:
            announcements = await self.bus.listen(
                subjects.for_id(subjects.PIECE_ANNOUNCED, task_id), PieceAnnounced, on_announced
            )
        except Exception as exc:  # Without them the download polls, as it always can.
            logger.info("no piece announcements for %s: %r", task_id, exc)
            announcements = None
        try:
            await self._download(download)
        except asyncio.CancelledError:
            raise
        except DamselflyError as exc:
            self._fail(download, exc)
        except Exception as exc:
            logger.exception("download of %s failed", download.request.task_id)
            self._fail(download, UpstreamError(f"download failed: {exc!r}"))
        finally:
            if announcements is not None:
                with contextlib.suppress(Exception):
                    await announcements.unsubscribe()
            if self._downloads.get(download.request.task_id) is download and download.failure is None:
                del self._downloads[download.request.task_id]

    def _fail(self, download: TaskDownload, error: DamselflyError) -> None:
        download.failure = error
        if not download.layout.done():
            download.layout.set_exception(error)
            download.layout.exception()  # Mark retrieved: waiters may have gone.
        for event in download.ready.values():
            event.set()

    def _missing(self, download: TaskDownload, count: int) -> list[int]:
        order = list(dict.fromkeys([*download.urgent, *range(count)]))
        wanted = download.wanted
        return [n for n in order if n not in download.held and (wanted is None or n in wanted or n in download.urgent)]

    async def _download(self, download: TaskDownload) -> None:
        request = download.request
        next_assignment_at = 0.0
        # Piece number -> the fetch carrying it (a run of consecutive pieces shares one); a fetch returns
        # the numbers it could not get.
        in_flight: dict[int, asyncio.Task[set[int]]] = {}
        count: int | None = None
        while True:
            if count is not None:
                missing = self._missing(download, count)
                if not missing and not in_flight:
                    if len(download.held) == count:
                        await asyncio.to_thread(self.store.mark_completed, request.task_id)
                        return
                    # Without prefetch only what readers asked for is fetched: stay ready for their next
                    # ranges (a lazy reader asks many times) rather than start over for each.
                    download.wakeup.clear()
                    try:
                        await asyncio.wait_for(download.wakeup.wait(), IDLE_DOWNLOAD_SECONDS)
                    except TimeoutError:
                        return
                    continue
                for run in self._runs(download, [n for n in missing if n not in in_flight]):
                    if len(set(in_flight.values())) >= self.parallel_pieces:
                        break
                    fetch = asyncio.create_task(self._fetch_run(download, run))
                    for assignment in run:
                        in_flight[assignment.piece_number] = fetch
                unassigned = [n for n in missing if n not in in_flight and n not in download.assignments]
            else:
                unassigned = []
            now = time.monotonic()
            if (count is None or unassigned) and (now >= next_assignment_at or download.ask_now):
                download.ask_now = False
                if count is not None:
                    wanted: list[int] | None = unassigned[:256]
                else:
                    # Before the layout is known: the pieces a reader named (on-demand), else the blob.
                    wanted = list(dict.fromkeys(download.urgent))[:256] if download.wanted is not None else None
                    wanted = wanted or None
                reply = await self._request_assignment(download, wanted)
                next_assignment_at = time.monotonic() + max(reply.retry_after_ms, 20) / 1000
                download.seed_requested = download.seed_requested or reply.seed_requested
                if reply.status is TaskStatus.FAILED:
                    raise UpstreamError(f"the seed could not fetch {request.url}: {reply.error or 'unknown error'}")
                if count is None and reply.content_length is not None and reply.piece_size is not None:
                    task = await asyncio.to_thread(
                        self.store.open_task,
                        request.task_id,
                        url=request.url,
                        content_length=reply.content_length,
                        piece_size=reply.piece_size,
                        digest=request.digest,
                    )
                    if request.piece_size is not None and task.piece_size != request.piece_size:
                        # Another layout was registered first: the numbers named so far meant other bytes.
                        # Every reader names its pieces again from the layout once open() has it.
                        download.urgent.clear()
                        download.assignments.clear()
                        if download.wanted is not None:
                            download.wanted.clear()
                    request.piece_size = task.piece_size  # From now on the numbers are the registered layout's.
                    held = await asyncio.to_thread(self.store.held_pieces, request.task_id)
                    download.held.update(held)
                    for number in held:
                        download.event(number).set()
                    count = task.piece_count
                    if not download.layout.done():
                        download.layout.set_result(task)
                for assignment in reply.pieces:
                    for parent in assignment.parents:
                        self._parents[parent.peer_id] = parent
                    if assignment.piece_number not in download.held and assignment.parents:
                        download.assignments[assignment.piece_number] = assignment
                continue
            wakeup = asyncio.ensure_future(download.wakeup.wait())
            waiters: set[asyncio.Future[Any]] = {wakeup, *in_flight.values()}
            timeout = max(next_assignment_at - now, 0.0) if (count is None or unassigned) else None
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            download.wakeup.clear()
            wakeup.cancel()
            for number, fetch in list(in_flight.items()):
                if fetch.done():
                    del in_flight[number]
                    if number in fetch.result():
                        download.assignments.pop(number, None)

    async def _request_assignment(self, download: TaskDownload, wanted: list[int] | None) -> AssignmentReply:
        request = download.request
        message = AssignmentRequest(
            task_id=request.task_id,
            peer_id=self.peer_id,
            url=request.url,
            digest=request.digest,
            content_length=request.content_length,
            pieces_wanted=wanted,
            authorization=request.authorization,
            piece_size=request.piece_size,
        )
        try:
            return await self.bus.request(message, AssignmentReply, timeout=self.assignment_timeout)
        except DependencyUnavailable as exc:
            logger.warning("no assignment for %s yet: %s", request.task_id, exc)
            return AssignmentReply(task_id=request.task_id, status=TaskStatus.UNKNOWN, retry_after_ms=500)

    def _runs(self, download: TaskDownload, numbers: list[int]) -> list[list[PieceAssignment]]:
        """The assigned pieces among ``numbers`` (in their order), grouped into runs of consecutive pieces
        whose best parent is the same, each run at most ``RUN_BYTES``: one request fetches a run."""
        runs: list[list[PieceAssignment]] = []
        for number in numbers:
            assignment = download.assignments.get(number)
            if assignment is None or not assignment.parents:
                continue
            if runs:
                last = runs[-1][-1]
                fits = sum(a.range_length for a in runs[-1]) + assignment.range_length <= RUN_BYTES
                if (
                    fits
                    and number == last.piece_number + 1
                    and assignment.range_start == last.range_start + last.range_length
                    and assignment.parents[0].peer_id == last.parents[0].peer_id
                ):
                    runs[-1].append(assignment)
                    continue
            runs.append([assignment])
        return runs

    async def _fetch_run(self, download: TaskDownload, run: list[PieceAssignment]) -> set[int]:
        """Fetch a run of consecutive pieces from their best parent in one range request, each piece checked
        against its digest as it is stored; what that does not bring is fetched piece by piece, trying every
        parent in turn. Returns the numbers that could not be fetched."""
        failed: set[int] = set()
        remaining = run
        parent = run[0].parents[0]
        if len(run) > 1 and parent.peer_id != self.peer_id:
            remaining = await self._fetch_range_of_pieces(download, parent, run)
        for assignment in remaining:
            if not await self._fetch_piece(download, assignment):
                failed.add(assignment.piece_number)
        return failed

    async def _fetch_range_of_pieces(
        self, download: TaskDownload, parent: ParentCandidate, run: list[PieceAssignment]
    ) -> list[PieceAssignment]:
        """One ``Range`` request to ``parent`` for the run's bytes, its pieces checked and stored together
        (one lock, one transaction); returns the pieces it did not yield."""
        task_id = download.request.task_id
        first, last = run[0], run[-1]
        start, end = first.range_start, last.range_start + last.range_length - 1
        started = time.perf_counter()
        try:
            url = f"{parent.upload_url}/download/{task_id}"
            timeout = aiohttp.ClientTimeout(total=self.piece_timeout, sock_connect=3)
            async with self.session.get(url, headers={"Range": f"bytes={start}-{end}"}, timeout=timeout) as response:
                if response.status != 206 or response.content_length != end - start + 1:
                    # Busy, or not every piece held after all: piece by piece says which, and reports it.
                    return run
                data = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            logger.info("range %d-%d of %s from %s failed: %r", start, end, task_id[:12], parent.peer_id, exc)
            return run
        if len(data) != end - start + 1:
            return run
        if self.rate_limit is not None:
            await self.rate_limit.take(len(data))
        view = memoryview(data)
        pieces = [
            (a.piece_number, view[a.range_start - start : a.range_start - start + a.range_length], a.digest)
            for a in run
        ]
        source = self._source_from(download, parent)
        checked = {
            assignment.piece_number
            for assignment, (_number, piece, _digest) in zip(run, pieces, strict=True)
            if download.hand_over(assignment.piece_number, piece, assignment.digest, source)
        }
        try:
            written = await asyncio.to_thread(self.store.write_pieces, task_id, pieces, checked=checked)
        finally:
            for assignment in run:
                download.take_back(assignment.piece_number)
        left = []
        for assignment in run:
            number = assignment.piece_number
            if number in written.stored:
                self._stored(download, assignment, parent, written.stored[number], started)
                continue
            failure = written.failed.get(number)
            if failure is not None:
                reason = PieceFailureReason.DIGEST_MISMATCH
                await self._report_failure(download, number, parent, reason, failure.message)
            left.append(assignment)
        return left

    async def _store_piece(
        self,
        download: TaskDownload,
        assignment: PieceAssignment,
        parent: ParentCandidate,
        data: bytes | memoryview,
        started: float,
    ) -> bool:
        """Check and store a fetched piece, wake its readers and announce it; False (reported) if corrupt."""
        task_id = download.request.task_id
        number = assignment.piece_number
        checked = download.hand_over(number, data, assignment.digest, self._source_from(download, parent))
        try:
            digest = await asyncio.to_thread(
                self.store.write_piece, task_id, number, data, assignment.digest, checked=checked
            )
        except DigestMismatch as exc:
            await self._report_failure(download, number, parent, PieceFailureReason.DIGEST_MISMATCH, exc.message)
            return False
        finally:
            download.take_back(number)
        self._stored(download, assignment, parent, digest, started)
        return True

    @staticmethod
    def _source_from(download: TaskDownload, parent: ParentCandidate) -> ServedFrom:
        return ServedFrom.ORIGIN if download.seed_requested and parent.is_seed else ServedFrom.PEER

    def _stored(
        self, download: TaskDownload, assignment: PieceAssignment, parent: ParentCandidate, digest: str, started: float
    ) -> None:
        """A piece is on disk: count it, wake its readers, announce it."""
        number = assignment.piece_number
        elapsed = time.perf_counter() - started
        kind = ParentKind.SEED if parent.is_seed else ParentKind.PEER
        self.metrics.piece_download_seconds.labels(parent=kind.value).observe(elapsed)
        download.sources[number] = self._source_from(download, parent)
        download.bytes_from_peers += assignment.range_length
        download.held.add(number)
        download.event(number).set()
        # Announced in the background: readers were woken above, and the next piece need not wait for
        # JetStream's acknowledgement of this one.
        self._announce_soon(
            PieceAnnounced(
                task_id=download.request.task_id,
                piece_number=number,
                range_start=assignment.range_start,
                range_length=assignment.range_length,
                digest=digest,
                holder=self.peer_id,
                source=PieceSource.PEER,
                parent_id=parent.peer_id,
                cost_ms=elapsed * 1000,
            )
        )

    async def _report_failure(
        self, download: TaskDownload, number: int, parent: ParentCandidate, reason: PieceFailureReason, detail: str
    ) -> None:
        task_id = download.request.task_id
        logger.info("piece %d of %s from %s failed: %s %s", number, task_id[:12], parent.peer_id, reason, detail)
        self.metrics.piece_failures.labels(reason=reason.value).inc()
        await self._publish(
            PieceFailed(
                task_id=task_id,
                piece_number=number,
                parent_id=parent.peer_id,
                reporter_id=self.peer_id,
                reason=reason,
                detail=detail[:500],
            )
        )

    async def _fetch_piece(self, download: TaskDownload, assignment: PieceAssignment) -> bool:
        """Try each parent in rank order; True once the piece is stored and announced."""
        task_id = download.request.task_id
        number = assignment.piece_number
        for parent in assignment.parents:
            if parent.peer_id == self.peer_id:
                continue
            started = time.perf_counter()
            reason: PieceFailureReason | None = None
            detail = ""
            try:
                url = f"{parent.upload_url}/download/{task_id}/pieces/{number}"
                timeout = aiohttp.ClientTimeout(total=self.piece_timeout, sock_connect=3)
                async with self.session.get(url, timeout=timeout) as response:
                    if response.status == 200:
                        data = await response.read()
                        if self.rate_limit is not None:
                            await self.rate_limit.take(len(data))
                    elif response.status == 503:
                        continue  # Busy (no free upload slot): not the parent's fault.
                    else:
                        reason = (
                            PieceFailureReason.NOT_HELD if response.status == 404 else PieceFailureReason.HTTP_ERROR
                        )
                        detail = f"HTTP {response.status}"
            except TimeoutError:
                reason, detail = PieceFailureReason.TIMEOUT, f"no piece in {self.piece_timeout}s"
            except aiohttp.ClientError as exc:
                reason, detail = PieceFailureReason.CONNECTION, str(exc)
            if reason is None:
                if await self._store_piece(download, assignment, parent, data, started):
                    return True
                continue  # Corrupt (reported): the next parent.
            await self._report_failure(download, number, parent, reason, detail)
        return False

    async def _publish(self, event: PieceAnnounced | PieceFailed) -> None:
        try:
            await self.bus.publish(event)
        except DependencyUnavailable as exc:
            # The piece is on disk either way; the next heartbeat-time re-announce is a later concern.
            logger.warning("could not publish %s: %s", event.name, exc)


async def _read_open(opened: OpenPiece) -> AsyncIterator[bytes]:
    """Read an open range in 1 MiB chunks, off the event loop; closes it."""
    try:
        offset, length = opened.offset, opened.length
        while length > 0:
            chunk = await asyncio.to_thread(os.pread, opened.fd, min(READ_CHUNK, length), offset)
            if not chunk:
                raise UpstreamError(f"the data file of the range at {opened.offset} is shorter than its pieces")
            offset += len(chunk)
            length -= len(chunk)
            yield chunk
    finally:
        opened.close()
