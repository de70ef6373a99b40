"""Back to source: fetch a blob's pieces from the origin, store each, announce each at once.

Pieces are fetched with parallel ``Range`` requests, lowest numbers first, so peers streaming the blob
get its beginning soonest. Each stored piece is announced the moment it lands. Consecutive small pieces
(a lazy reader's layout) share one request of at most ``RUN_BYTES``, each stored and announced as soon as
its own bytes are in; what a cut request did not bring is fetched piece by piece. A job redelivered after
a crash resumes: pieces already in the store are announced again (JetStream drops the duplicates) and
only the missing ones are fetched.

A job is for the whole blob, or (``pieces`` set) on demand: a lazy reader wants a few ranges of a layer,
and the origin should send those, not the layer. An on-demand job fetches the pieces it names and those
the scheduler's priority hints add while it lives; it ends after ``idle_seconds`` without a new one
(the pieces still missing are fetched by a later job when someone wants them), or fetches everything
once a hint says a peer wants the whole blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterable

from services.seed_fetcher.metrics import JobOutcome, SeedMetrics
from shared import subjects
from shared.bus import Bus
from shared.errors import (
    BlobDigestMismatch,
    BusDisposition,
    DamselflyError,
    Forbidden,
    InvalidRequest,
    bus_disposition_of,
)
from shared.piece_store import PieceStore
from shared.ratelimit import TokenBucket
from shared.registry_client import OriginClient, normalise_origin
from shared.schemas import (
    PieceAnnounced,
    PieceSource,
    SeedFetchCompleted,
    SeedFetchRequested,
    SeedPriority,
    TaskRegistered,
)
from shared.tasks import piece_count, piece_range, piece_size_for

logger = logging.getLogger(__name__)

_READ_BLOCK = 4 * 1024 * 1024
# Consecutive small pieces (a lazy reader's 256 KiB layout) are fetched with one origin range request of
# at most this many bytes; each is stored and announced as soon as its own bytes are in. Larger pieces
# (whole-blob layouts) are one request each, as before.
RUN_BYTES = 1024 * 1024


class PieceQueue:
    """Pieces still to fetch: lowest number first, except those peers are waiting for, which jump ahead."""

    def __init__(self, numbers: Iterable[int], known: Iterable[int] = ()) -> None:
        self._pending: dict[int, None] = dict.fromkeys(numbers)
        self._priority: deque[int] = deque()
        # Every piece ever queued or already held: add() never queues one twice.
        self._known: set[int] = set(self._pending) | set(known)

    def add(self, numbers: Iterable[int]) -> int:
        """Queue pieces not queued before (in ascending order among the plain ones); how many were new."""
        new = sorted(set(numbers) - self._known)
        self._known.update(new)
        pending = {**self._pending, **dict.fromkeys(new)}
        self._pending = dict.fromkeys(sorted(pending))
        return len(new)

    def prioritize(self, numbers: Iterable[int]) -> None:
        """Fetch ``numbers`` next, in their order (ones already fetched or under way are skipped)."""
        for number in reversed(list(numbers)):
            if number in self._pending:
                self._priority.appendleft(number)

    def next(self) -> int | None:
        """The next piece to fetch, or None when none is left."""
        while self._priority:
            number = self._priority.popleft()
            if number in self._pending:
                del self._pending[number]
                return number
        if self._pending:
            number = next(iter(self._pending))
            del self._pending[number]
            return number
        return None

    def next_run(self, limit: int) -> list[int]:
        """The next piece and the pending ones right after it, at most ``limit``: one range request's worth.

        Empty when nothing is left."""
        first = self.next()
        if first is None:
            return []
        run = [first]
        while len(run) < limit and run[-1] + 1 in self._pending:
            del self._pending[run[-1] + 1]
            run.append(run[-1] + 1)
        return run


class SeedFetcher:
    """Runs seed-fetch jobs for one seed node (its own piece store, its own peer id)."""

    def __init__(
        self,
        *,
        seed_id: str,
        store: PieceStore,
        origin: OriginClient,
        bus: Bus,
        allowed_origins: Iterable[str],
        parallel_ranges: int,
        metrics: SeedMetrics,
        rate_limit: TokenBucket | None = None,
        idle_seconds: float = 15.0,
    ) -> None:
        self.seed_id = seed_id
        self.store = store
        self.origin = origin
        self.bus = bus
        self.allowed_origins = {normalise_origin(url) for url in allowed_origins}
        self.parallel_ranges = parallel_ranges
        self.rate_limit = rate_limit
        self.metrics = metrics
        self.idle_seconds = idle_seconds
        self.bytes_fetched = 0

    def check_allowed(self, url: str) -> None:
        """Refuse origins off the allow-list: the seed is not an open proxy either."""
        if normalise_origin(url) not in self.allowed_origins:
            raise Forbidden(f"origin of {url} is not on the seed's allow-list", url=url)

    async def run(self, job: SeedFetchRequested) -> None:
        """Fetch, store and announce the job's pieces (every piece, or those wanted); report completion."""
        try:
            self.check_allowed(job.url)
            content_length = job.content_length
            if content_length is None:
                content_length = await self.origin.content_length(job.url, job.authorization)
            piece_size = job.piece_size or piece_size_for(content_length)
            await asyncio.to_thread(
                self.store.open_task,
                job.task_id,
                url=job.url,
                content_length=content_length,
                piece_size=piece_size,
                digest=job.digest,
            )
            count = piece_count(content_length, piece_size)
            await self.bus.publish(
                TaskRegistered(
                    task_id=job.task_id,
                    url=job.url,
                    digest=job.digest,
                    content_length=content_length,
                    piece_size=piece_size,
                    piece_count=count,
                    registered_by=self.seed_id,
                )
            )
            held = await asyncio.to_thread(self.store.held_pieces, job.task_id)
            for number, digest in sorted(held.items()):
                await self._announce(job, number, content_length, piece_size, digest, cost_ms=0.0)
            wanted = range(count) if job.pieces is None else sorted({n for n in job.pieces if n < count})
            missing = [number for number in wanted if number not in held]
            if missing:
                logger.info(
                    "fetching %d of %d pieces of %s%s",
                    len(missing),
                    count,
                    job.url,
                    " on demand" if job.pieces is not None else "",
                    extra={"task_id": job.task_id},
                )
            await self._fetch_pieces(job, missing, held, content_length, piece_size, count)
            stored = await asyncio.to_thread(self.store.held_pieces, job.task_id)
            if len(stored) == count:
                if job.digest:
                    await asyncio.to_thread(self._verify_blob, job.task_id, job.digest, content_length)
                await asyncio.to_thread(self.store.mark_completed, job.task_id)
            await self.bus.publish(
                SeedFetchCompleted(
                    task_id=job.task_id,
                    seed_id=self.seed_id,
                    attempt=job.attempt,
                    ok=True,
                    content_length=content_length,
                    piece_count=count,
                )
            )
        except Exception as exc:
            disposition = bus_disposition_of(exc)
            if isinstance(exc, DamselflyError) and disposition is BusDisposition.TERM:
                # The job can never succeed: tell the scheduler, so waiting peers fail fast.
                await self._report_failure(job, exc)
            outcome = JobOutcome.FAILED if disposition is BusDisposition.TERM else JobOutcome.RETRIED
            self.metrics.back_to_source.labels(outcome=outcome.value).inc()
            raise
        self.metrics.back_to_source.labels(outcome=JobOutcome.COMPLETED.value).inc()

    async def _fetch_pieces(
        self,
        job: SeedFetchRequested,
        numbers: list[int],
        held: Iterable[int],
        length: int,
        piece_size: int,
        count: int,
    ) -> None:
        """Fetch ``numbers`` with parallel workers; on demand, also what hints add until idle."""
        queue = PieceQueue(numbers, known=held)
        whole = job.pieces is None
        arrived = asyncio.Event()
        last_activity = time.monotonic()

        async def prioritize(hint: SeedPriority) -> None:
            nonlocal whole, last_activity
            if hint.whole and not whole:
                whole = True  # A peer wants the blob: everything, lowest first after the hinted ones.
                queue.add(range(count))
            if not whole:
                queue.add(number for number in hint.pieces if number < count)
            queue.prioritize(hint.pieces)
            last_activity = time.monotonic()
            arrived.set()

        # While this blob is fetched, the scheduler names the pieces peers are waiting for.
        subscription = await self.bus.listen(
            subjects.for_id(subjects.SEED_PRIORITY, job.task_id), SeedPriority, prioritize
        )

        run_limit = max(1, RUN_BYTES // piece_size)

        async def worker() -> None:
            nonlocal last_activity
            while True:
                arrived.clear()
                run = queue.next_run(run_limit)
                if run:
                    await self._fetch_run(job, run, length, piece_size)
                    last_activity = time.monotonic()
                    continue
                if whole:
                    return
                # On demand: wait for a hint to add pieces, until the job has been idle long enough.
                left = self.idle_seconds - (time.monotonic() - last_activity)
                if left <= 0:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), left)

        width = self.parallel_ranges if not whole else min(self.parallel_ranges, len(numbers))
        workers = [asyncio.create_task(worker()) for _ in range(width)]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _fetch_run(self, job: SeedFetchRequested, numbers: list[int], length: int, piece_size: int) -> None:
        """Consecutive pieces with one origin range request, each stored and announced as soon as it is in.

        Whatever the request did not bring (an origin that ignores Range, a cut connection) is then
        fetched piece by piece, with the usual retries."""
        if len(numbers) == 1:
            await self._fetch_piece(job, numbers[0], length, piece_size)
            return
        pieces = [piece_range(number, length, piece_size) for number in numbers]
        started = time.perf_counter()
        stores: list[asyncio.Task[None]] = []
        try:
            parts = self.origin.range_parts(job.url, pieces[0].start, [p.length for p in pieces], job.authorization)
            async for data in parts:
                await self._took(data)
                number = numbers[len(stores)]
                store = self._store_and_announce(job, number, data, length, piece_size, started)
                stores.append(asyncio.create_task(store))
        except DamselflyError as exc:
            logger.info(
                "range of pieces %d-%d of %s ended after %d: %s; fetching the rest piece by piece",
                numbers[0],
                numbers[-1],
                job.url,
                len(stores),
                exc,
                extra={"task_id": job.task_id},
            )
        finally:
            self.metrics.origin_range_seconds.observe(time.perf_counter() - started)
        outcomes = await asyncio.gather(*stores, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for number in numbers[len(stores) :]:
            await self._fetch_piece(job, number, length, piece_size)

    async def _fetch_piece(self, job: SeedFetchRequested, number: int, length: int, piece_size: int) -> None:
        piece = piece_range(number, length, piece_size)
        started = time.perf_counter()
        data = await self.origin.fetch_range(job.url, piece.start, piece.end - 1, job.authorization)
        self.metrics.origin_range_seconds.observe(time.perf_counter() - started)
        await self._took(data)
        await self._store_and_announce(job, number, data, length, piece_size, started)

    async def _took(self, data: bytes) -> None:
        """Count bytes that came from the origin (and hold to the rate limit)."""
        self.metrics.origin_bytes.inc(len(data))
        if self.rate_limit is not None:
            await self.rate_limit.take(len(data))
        self.bytes_fetched += len(data)

    async def _store_and_announce(
        self, job: SeedFetchRequested, number: int, data: bytes, length: int, piece_size: int, started: float
    ) -> None:
        digest = await asyncio.to_thread(self.store.write_piece, job.task_id, number, data)
        await self._announce(job, number, length, piece_size, digest, cost_ms=(time.perf_counter() - started) * 1000)

    async def _announce(
        self, job: SeedFetchRequested, number: int, length: int, piece_size: int, digest: str, cost_ms: float
    ) -> None:
        piece = piece_range(number, length, piece_size)
        await self.bus.publish(
            PieceAnnounced(
                task_id=job.task_id,
                piece_number=number,
                range_start=piece.start,
                range_length=piece.length,
                digest=digest,
                holder=self.seed_id,
                source=PieceSource.ORIGIN,
                cost_ms=cost_ms,
            )
        )

    def _verify_blob(self, task_id: str, expected: str, content_length: int) -> None:
        """Hash the whole stored blob; on a mismatch forget it, so nothing wrong is served again."""
        task = self.store.get_task(task_id)
        if task is None:
            raise InvalidRequest(f"task {task_id} vanished while it was being fetched")
        # Straight from the data file: read_piece would hash every piece a second time, and the blob
        # digest covers every byte anyway.
        hasher = hashlib.sha256()
        with self.store.data_path(task_id).open("rb") as data:
            remaining = task.content_length
            while remaining > 0:
                block = data.read(min(_READ_BLOCK, remaining))
                if not block:
                    break
                hasher.update(block)
                remaining -= len(block)
        actual = "sha256:" + hasher.hexdigest()
        if actual != expected:
            self.store.delete_task(task_id)
            raise BlobDigestMismatch(expected, actual, what=f"blob of task {task_id}")

    async def _report_failure(self, job: SeedFetchRequested, exc: DamselflyError) -> None:
        try:
            await self.bus.publish(
                SeedFetchCompleted(
                    task_id=job.task_id, seed_id=self.seed_id, attempt=job.attempt, ok=False, error=exc.message[:2000]
                )
            )
        except DamselflyError as publish_error:
            logger.warning("could not report the failed fetch of %s: %s", job.task_id, publish_error)
