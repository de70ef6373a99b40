"""One lazy mount, one process (Damselfly's nydusd): ``python -m services.chunk_fuse.daemon --spec FILE``.

The main thread runs libfuse's multi-threaded loop (mfusepy); reads block their FUSE thread while an
asyncio loop in a second thread does the HTTP (aiohttp) and serves the control API on a unix socket
(``/api/v1/stats``, ``/api/v1/trace``).  The spawner learns the outcome from one JSON line on a pipe: the
mount is ready (the kernel has completed FUSE's INIT and a stat of the mount point answered) or it failed
and why.  SIGTERM, SIGINT or an unmount end the loop; libfuse unmounts and the daemon exits 0.  The mount is
made with ``auto_unmount``, so even a daemon killed with SIGKILL leaves no dead mount behind.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import mfusepy
from aiohttp import web

from services.chunk_fuse.backend import BackendStats, RegistryBackend
from services.chunk_fuse.cache import ChunkCache
from services.chunk_fuse.fs import ImageFS
from services.chunk_fuse.image import LazyImage, open_image, registry_ref
from services.chunk_fuse.prefetch import Prefetcher
from services.chunk_fuse.reader import AccessTrace, ChunkReader, ReadStats
from services.chunk_fuse.records import MountRecord, MountSpec, remove_record, write_record
from shared.errors import DamselflyError
from shared.image_format import BlobInfo, ImageFormatError
from shared.oci.manifest import Platform

logger = logging.getLogger("damselfly.chunk_fuse.daemon")
T = TypeVar("T")

#: Readahead the kernel uses for this mount (KiB): a read of 128 KiB pages is a FUSE round trip each.
READ_AHEAD_KB = 1024


class LoopThread:
    """An asyncio loop in a daemon thread, for the blocking FUSE threads to hand coroutines to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="asyncio", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> None:
        """Start the loop."""
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine; its result arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for it."""
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        """Stop the loop and wait for its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class LoopFetcher:
    """The reader's RangeFetcher: blob ranges through the registry backend on the loop."""

    def __init__(self, loop: LoopThread, backend: RegistryBackend) -> None:
        self.loop = loop
        self.backend = backend

    def fetch(self, blob: BlobInfo, offset: int, length: int) -> concurrent.futures.Future[bytes]:
        """Start a Range request."""
        return self.loop.submit(self.backend.get_range(blob.digest, offset, length))


def set_read_ahead(mountpoint: Path, kb: int) -> bool:
    """Raise the mount's readahead via its BDI (the FUSE ``max_read`` option would break the mount)."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(kb))
        return True
    except OSError as exc:
        logger.info("cannot set %s: %s", path, exc)
        return False


class MountDaemon:
    """Resolve the image, mount it, serve it until unmounted."""

    def __init__(self, spec: MountSpec, ready_fd: int | None, log_path: Path | None = None) -> None:
        self.spec = spec
        self.ready_fd = ready_fd
        self.log_path = log_path
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.loop = LoopThread()
        self.backend_stats = BackendStats()
        self.read_stats = ReadStats()
        self.backend: RegistryBackend | None = None
        self.image: LazyImage | None = None
        self.reader: ChunkReader | None = None
        self.cache: ChunkCache | None = None
        self.prefetcher: Prefetcher | None = None
        self.trace: AccessTrace | None = None
        self.metadata_seconds = 0.0
        self.bootstrap_seconds = 0.0
        self.ready_seconds: float | None = None
        self._runner: web.AppRunner | None = None
        self._reported = False

    # -- readiness pipe -----------------------------------------------------------------------------

    def _report(self, message: dict[str, Any]) -> None:
        if self._reported or self.ready_fd is None:
            return
        self._reported = True
        try:
            os.write(self.ready_fd, (json.dumps(message) + "\n").encode())
            os.close(self.ready_fd)
        except OSError:
            pass

    # -- setup --------------------------------------------------------------------------------------

    async def _open(self) -> None:
        config = self.spec.config
        ref = registry_ref(self.spec.image)
        self.backend = RegistryBackend(config.backend, ref, self.backend_stats)
        await self.backend.open()
        cache_dir = config.cache.work_dir if config.cache.type == "blobcache" else None
        started = time.monotonic()
        self.image = await open_image(self.backend, cache_dir, Platform.parse(self.spec.platform))
        self.bootstrap_seconds = time.monotonic() - started
        await self._serve_control()

    async def _serve_control(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/stats", self._stats_route)
        app.router.add_get("/api/v1/trace", self._trace_route)
        app.router.add_get("/healthz", self._health_route)
        app.router.add_post("/api/v1/memory/drop", self._drop_memory_route)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = self.spec.control_socket
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        await web.UnixSite(self._runner, str(sock)).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.backend is not None:
            await self.backend.close()

    # -- control API --------------------------------------------------------------------------------

    async def _health_route(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "ready": self.ready_seconds is not None})

    async def _drop_memory_route(self, _request: web.Request) -> web.Response:
        # In a thread: it first waits for the chunks still being written to the disk cache.
        dropped = await asyncio.to_thread(self.reader.drop_memory) if self.reader is not None else 0
        return web.json_response({"dropped_chunks": dropped})

    async def _stats_route(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _trace_route(self, _request: web.Request) -> web.Response:
        trace = self.trace
        body: dict[str, Any] = {"image_digest": self.image.digest if self.image else None}
        if trace is None:
            body.update(recording=False, complete=False, chunks=[])
        else:
            body.update(recording=True, complete=trace.complete, chunks=list(trace.chunks))
        return web.json_response(body)

    def stats(self) -> dict[str, Any]:
        """Everything the agent exports about this mount."""
        image = self.image
        cache = self.cache
        return {
            "id": self.spec.id,
            "pid": os.getpid(),
            "image": self.spec.image,
            "digest": image.digest if image else None,
            "mountpoint": str(self.spec.mountpoint),
            "started_at": self.started_wall,
            "ready_seconds": self.ready_seconds,
            "metadata_seconds": self.metadata_seconds,
            "bootstrap": {
                "size": image.bootstrap.size if image else 0,
                "from_cache": image.bootstrap_from_cache if image else False,
                "fetch_seconds": round(self.bootstrap_seconds, 4),
            },
            "backend": self.backend_stats.snapshot(),
            "mirrors": [
                {"host": m.config.host, "healthy": m.healthy} for m in (self.backend.mirrors if self.backend else [])
            ],
            "reads": self.read_stats.snapshot(),
            "prefetch": self.prefetcher.progress.snapshot() if self.prefetcher else {"state": "off"},
            "cache": {
                "work_dir": str(cache.root.parent) if cache else None,
                "evicted_chunks": cache.evicted_chunks if cache else 0,
                "evicted_bytes": cache.evicted_bytes if cache else 0,
            },
            "learned": {
                "given": self.spec.learned_chunks is not None,
                "recording": self.trace is not None and not self.trace.complete,
                "recorded_chunks": len(self.trace.chunks) if self.trace else 0,
            },
        }

    # -- after the kernel's INIT --------------------------------------------------------------------

    def _on_init(self) -> None:
        # INIT is still being answered here; the stat that proves the mount must come from another thread.
        threading.Thread(target=self._after_mount, name="ready", daemon=True).start()

    def _after_mount(self) -> None:
        try:
            set_read_ahead(self.spec.mountpoint, self.spec.config.read_ahead_kb)
            if self.prefetcher is not None:
                self.prefetcher.start()
            self.ready_seconds = time.monotonic() - self.started
            assert self.image is not None
            write_record(
                self.spec,
                MountRecord(
                    id=self.spec.id,
                    pid=os.getpid(),
                    image=self.spec.image,
                    digest=self.image.digest,
                    mountpoint=self.spec.mountpoint,
                    control_socket=self.spec.control_socket,
                    owner=self.spec.owner,
                    log_path=self.log_path,
                    started_at=self.started_wall,
                ),
            )
            logger.info(
                "mounted %s (%s) at %s in %.3fs (bootstrap %d bytes%s)",
                self.spec.image,
                self.image.digest,
                self.spec.mountpoint,
                self.ready_seconds,
                self.image.bootstrap.size,
                ", from cache" if self.image.bootstrap_from_cache else "",
            )
            self._report(
                {
                    "ok": True,
                    "id": self.spec.id,
                    "pid": os.getpid(),
                    "digest": self.image.digest,
                    "ready_seconds": self.ready_seconds,
                    "metadata_seconds": self.metadata_seconds,
                    "control_socket": str(self.spec.control_socket),
                    "config": self.image.runtime_config,
                }
            )
        except Exception as exc:
            logger.exception("mount did not become ready")
            self._report({"ok": False, "error": f"mount did not become ready: {exc}"})
            mfusepy.fuse_exit()

    # -- main ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Mount and serve until unmounted; the exit code."""
        spec = self.spec
        self.loop.start()
        try:
            started = time.monotonic()
            backend = spec.config.backend
            self.loop.call(self._open(), timeout=backend.timeout * (backend.retry_limit + 1) * 6 + 30)
            assert self.image is not None and self.backend is not None
            bootstrap = self.image.bootstrap
            config = spec.config
            if config.cache.type == "blobcache":
                self.cache = ChunkCache(config.cache.work_dir, config.cache.size_limit)
            self.reader = ChunkReader(
                bootstrap,
                LoopFetcher(self.loop, self.backend),
                self.cache,
                digest_validate=config.digest_validate,
                amplify_io=config.amplify_io,
                merging_size=config.prefetch.merging_size,
                fetch_timeout=config.backend.timeout * (config.backend.retry_limit + 2) * 2,
                stats=self.read_stats,
                # A cold read waits for the network only; the chunk reaches the disk cache just after.
                write_behind=True,
            )
            learned = spec.learned_chunks or []
            if config.learned_prefetch.enable and spec.learned_chunks is None:
                # No list is known for this image: this is its first cold start, so record one.
                self.trace = AccessTrace(config.learned_prefetch.record_seconds, config.learned_prefetch.max_chunks)
                self.reader.trace = self.trace
            if config.prefetch.enable or (config.learned_prefetch.enable and learned):
                self.prefetcher = Prefetcher(self.reader, config.prefetch, learned=learned)
            operations = ImageFS(bootstrap, self.reader, enable_xattr=config.enable_xattr, on_init=self._on_init)
            self.metadata_seconds = time.monotonic() - started
        except (DamselflyError, ImageFormatError, OSError, concurrent.futures.TimeoutError) as exc:
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            logger.error("cannot mount %s: %s", spec.image, message)
            self._report({"ok": False, "error": message})
            self._shutdown()
            return 1
        try:
            mfusepy.FUSE(
                operations,
                str(spec.mountpoint),
                foreground=True,
                ro=True,
                allow_other=True,
                default_permissions=True,
                auto_unmount=True,
                fsname=f"damselfly-{spec.id}",
                subtype="damselfly",
            )
        except Exception as exc:
            logger.error("FUSE mount of %s failed: %s", spec.mountpoint, exc)
            self._report({"ok": False, "error": f"cannot mount at {spec.mountpoint}: {exc}"})
            return 1
        finally:
            self._shutdown()
        if not self._reported:
            self._report(
                {"ok": False, "error": f"cannot mount at {spec.mountpoint} (see {self.log_path or 'the log'})"}
            )
            return 1
        logger.info("unmounted %s", spec.mountpoint)
        return 0

    def _shutdown(self) -> None:
        remove_record(self.spec)
        if self.prefetcher is not None:
            self.prefetcher.stop()
        if self.reader is not None:
            self.reader.close()  # What was fetched is in the chunk cache before the daemon goes.
        with contextlib.suppress(Exception):
            self.loop.call(self._close(), timeout=10)
        self.loop.stop()
        self.spec.control_socket.unlink(missing_ok=True)


#: What a standby writes on its readiness pipe once its imports are done (before any mount's line).
STANDBY_LINE = b'{"standby": true}\n'


def _standby_spec(stdin: Any) -> Path | None:
    """A warm standby's wait: the spec path its spawner sends on stdin, or None when released (EOF)."""
    line = stdin.readline()
    return Path(line.strip()) if line.strip() else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the daemon process."""
    parser = argparse.ArgumentParser(prog="damselfly-mount-daemon", description="Serve one lazy image mount.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", type=Path, help="MountSpec JSON file")
    source.add_argument(
        "--standby",
        action="store_true",
        help="start now, read the MountSpec file's path from stdin later (a warm spare: imports are done)",
    )
    parser.add_argument("--ready-fd", type=int, help="pipe to write the readiness line to")
    parser.add_argument("--log-file", type=Path, help="where stderr goes (recorded for `damselfly umount`)")
    parser.add_argument("--log-level", default=os.environ.get("DAMSELFLY_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    # mfusepy logs every errno it returns (ENOENT on lookups of missing names is normal) at DEBUG.
    logging.getLogger("mfusepy").setLevel(logging.WARNING)
    spec_path: Path | None = args.spec
    if args.standby:
        # Everything this process needs is imported by now (the module's imports are most of a mount's
        # start-up); a mount handed to it starts serving in milliseconds. Say so, then wait for one.
        if args.ready_fd is not None:
            os.write(args.ready_fd, STANDBY_LINE)
        spec_path = _standby_spec(sys.stdin)
        if spec_path is None:
            return 0
    assert spec_path is not None
    spec = MountSpec.model_validate_json(spec_path.read_text())
    try:
        return MountDaemon(spec, args.ready_fd, args.log_file).run()
    finally:
        spec_path.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
