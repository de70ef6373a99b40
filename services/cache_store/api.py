"""The cache-store's HTTP routes: the upload server other peers download pieces from, and task inspection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from services.cache_store.metrics import CacheStoreMetrics
from services.cache_store.upload import Uploader
from shared.errors import DependencyUnavailable, DigestMismatch, PieceNotFound, RangeNotSatisfiable, TaskNotFound
from shared.piece_store import OpenPiece, PieceStore, StoredTask, validate_task_id
from shared.tasks import parse_range_header

router = APIRouter(tags=["upload"])

PIECE_DIGEST_HEADER = "Damselfly-Piece-Digest"
PieceNumber = Annotated[int, PathParam(ge=0, description="Piece number, from 0.")]


class TaskView(BaseModel):
    """A stored task and the pieces held of it."""

    task_id: str
    url: str
    digest: str | None
    content_length: int
    piece_size: int
    piece_count: int
    completed: bool
    created_at: datetime
    last_access_at: datetime
    pieces: list[int]
    piece_digests: dict[int, str]


def _store(request: Request) -> PieceStore:
    store: PieceStore = request.app.state.store
    return store


def _uploader(request: Request) -> Uploader:
    uploader: Uploader = request.app.state.uploader
    return uploader


def _slots_exhausted(uploader: Uploader) -> JSONResponse:
    error = DependencyUnavailable("all upload slots are busy; try again or another peer", slots=uploader.slots.limit)
    return JSONResponse(error.to_json(), status_code=error.http_status, headers={"Retry-After": "1"})


async def _open_checked(request: Request, task_id: str, opener: Callable[[PieceStore], OpenPiece]) -> OpenPiece:
    """Open a piece or range for serving, in a worker thread; a corrupt piece becomes a 404 (dropped)."""
    store = _store(request)

    def open_and_touch() -> OpenPiece:
        opened = opener(store)
        try:
            store.touch(task_id)
        except BaseException:
            opened.close()
            raise
        return opened

    try:
        return await asyncio.to_thread(open_and_touch)
    except DigestMismatch as exc:
        metrics: CacheStoreMetrics = request.app.state.cache_metrics
        metrics.corrupt_pieces_dropped.inc()
        # The store has forgotten the corrupt piece; to the downloader it is simply not here, so it
        # goes to another parent rather than retrying this one.
        raise PieceNotFound(f"{exc.message}; the piece was dropped", task_id=task_id) from exc


@router.get("/server/ping", summary="Liveness ping, as Dragonfly's upload server answers it (nydusd ping_url).")
async def ping() -> PlainTextResponse:
    """Answer ``pong``."""
    return PlainTextResponse("pong")


@router.get("/api/v1/peer", summary="This node's peer identity.")
async def whoami(request: Request) -> dict[str, object]:
    """This peer's PeerInfo."""
    return request.app.state.peer_info.model_dump(mode="json")  # type: ignore[no-any-return]


@router.get(
    "/download/{task_id}/pieces/{number}",
    summary="One piece's bytes, with its digest in the Damselfly-Piece-Digest header.",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        400: {"description": "Not a task id."},
        404: {"description": "The piece is not held (or was corrupt and has been dropped)."},
        503: {"description": "Every upload slot is busy (Retry-After: 1)."},
    },
)
async def download_piece(request: Request, task_id: str, number: PieceNumber) -> Response:
    """Stream one held, integrity-checked piece."""
    validate_task_id(task_id)
    uploader = _uploader(request)
    if not uploader.try_acquire():
        return _slots_exhausted(uploader)
    try:
        opened = await _open_checked(request, task_id, lambda store: store.open_piece(task_id, number))
    except BaseException:
        uploader.release()
        raise
    return uploader.response(opened, status_code=200, headers={PIECE_DIGEST_HEADER: opened.digest}, whole_pieces=1)


@router.get(
    "/download/{task_id}",
    summary="A byte range of a task (Range: bytes=a-b), from the pieces held; the whole task without Range.",
    response_class=Response,
    responses={
        206: {"content": {"application/octet-stream": {}}},
        400: {"description": "Not a task id, or several ranges."},
        404: {"description": "The task, or a piece under the range, is not held."},
        416: {"description": "The range lies outside the task."},
        503: {"description": "Every upload slot is busy (Retry-After: 1)."},
    },
)
async def download_range(
    request: Request, task_id: str, range_header: Annotated[str | None, Header(alias="range")] = None
) -> Response:
    """Stream a byte range (206) or the whole task (200) from held, integrity-checked pieces."""
    validate_task_id(task_id)
    task = await asyncio.to_thread(_store(request).get_task, task_id)
    if task is None:
        raise TaskNotFound(f"task {task_id} is not held here", task_id=task_id)
    try:
        parsed = parse_range_header(range_header, task.content_length)
    except RangeNotSatisfiable as exc:
        return JSONResponse(
            exc.to_json(),
            status_code=exc.http_status,
            headers={"Content-Range": f"bytes */{task.content_length}"},
        )
    headers = {"Accept-Ranges": "bytes"}
    if parsed is None:
        if task.content_length == 0:
            return Response(b"", status_code=200, headers=headers, media_type="application/octet-stream")
        start, end, status = 0, task.content_length - 1, 200
    else:
        (start, end), status = parsed, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{task.content_length}"
    uploader = _uploader(request)
    if not uploader.try_acquire():
        return _slots_exhausted(uploader)
    try:
        opened = await _open_checked(request, task_id, lambda store: store.open_range(task_id, start, end))
    except BaseException:
        uploader.release()
        raise
    # A peer fetching a run of pieces asks for exactly their bytes: count the pieces the range covers whole.
    first_whole = -(-start // task.piece_size)
    after_last_whole = (end + 1) // task.piece_size if end + 1 < task.content_length else task.piece_count
    whole_pieces = max(after_last_whole - first_whole, 0)
    return uploader.response(opened, status_code=status, headers=headers, whole_pieces=whole_pieces)


@router.get("/api/v1/tasks/{task_id}", summary="A stored task and the pieces held of it.", tags=["tasks"])
async def get_task(request: Request, task_id: str) -> TaskView:
    """The stored task and its held pieces."""
    validate_task_id(task_id)
    store = _store(request)

    def read() -> tuple[StoredTask | None, dict[int, str]]:
        return store.get_task(task_id), store.held_pieces(task_id)

    task, held = await asyncio.to_thread(read)
    if task is None:
        raise TaskNotFound(f"task {task_id} is not held here", task_id=task_id)
    return TaskView(
        task_id=task.task_id,
        url=task.url,
        digest=task.digest,
        content_length=task.content_length,
        piece_size=task.piece_size,
        piece_count=task.piece_count,
        completed=task.completed,
        created_at=task.created_at,
        last_access_at=task.last_access_at,
        pieces=sorted(held),
        piece_digests=held,
    )
