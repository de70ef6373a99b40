"""The agent's mounts: start and end daemons, keep their stats, share learned prefetch lists.

Each mount is a daemon process (services/chunk_fuse/daemon.py) with a control socket.  A poll task reads
every mount's stats once a second (for ``/metrics``, which must answer without waiting on sockets), reaps
daemons that ended (unmounted from outside, or killed), and publishes a learned prefetch list as soon as a
first cold start's recording window closes.  An agent that restarts adopts the live daemons it had
started, from their records in the run dir: mounts outlive the agent, as nydusd mounts do.

With ``keep_mounts_seconds`` the agent keeps each image mounted, as nydus-snapshotter keeps an image's
RAFS mount while the image is on the node: the daemon mounts under the run dir, and every mount asked for
with the same image, config and platform is a bind of that one mount onto the caller's mount point (a
syscall, not a daemon start). The image's mount ends ``keep_mounts_seconds`` after its last bind is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import subprocess
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from nats.js.kv import KeyValue

from services.chunk_fuse import learned
from services.chunk_fuse.backend import RegistryBackend
from services.chunk_fuse.config import ChunkFuseConfig
from services.chunk_fuse.image import DEFAULT_PLATFORM, registry_ref
from services.chunk_fuse.mount_config import MirrorConfig, MountConfig, mount_config_from_document
from services.chunk_fuse.records import MountRecord, MountSpec, list_records, record_path, write_record_at
from services.chunk_fuse.rundir import is_mounted, new_mount_id
from services.chunk_fuse.rundir import run_dir as default_run_dir
from services.chunk_fuse.sandbox import bind_mount, detach
from services.chunk_fuse.spawn import Standby, start_daemon, start_standby, unmount, wait_for_daemon
from shared.bus import Bus
from shared.errors import ConfigError, DependencyUnavailable, InvalidRequest, NotFound
from shared.oci.manifest import Descriptor
from shared.oci.store import resolve_image

logger = logging.getLogger(__name__)

# How long a reference's digest, as the last mount of it found it, is trusted for the learned-list lookup.
# A tag moved within this window only makes a mount prefetch the wrong chunks (it reads the right ones).
DIGEST_TRUST_SECONDS = 30.0


@dataclass
class ManagedMount:
    """One of this agent's mounts."""

    id: str
    image: str
    digest: str
    mountpoint: Path
    pid: int
    control_socket: Path
    created_at: float
    config: MountConfig | None = None
    process: subprocess.Popen[bytes] | None = None
    ready_seconds: float | None = None
    image_config: dict[str, Any] = field(default_factory=dict)
    learned_given: int | None = None
    trace_published: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    # A kept image mount: its key (image, config, platform), binds now using it, and when it ends unused.
    # A bind has the key of the kept mount it shows.
    kept_key: str | None = None
    is_bind: bool = False
    leases: int = 0
    expiry: asyncio.TimerHandle | None = None

    def describe(self) -> dict[str, Any]:
        """The mount as the API shows it (stats as of the last poll)."""
        return {
            "id": self.id,
            "image": self.image,
            "digest": self.digest,
            "mountpoint": str(self.mountpoint),
            "pid": self.pid,
            "created_at": self.created_at,
            "ready_seconds": self.ready_seconds,
            "image_config": self.image_config,
            "learned_prefetch_chunks": self.learned_given,
            "shared": self.is_bind,
            "stats": self.stats,
        }

    @property
    def alive(self) -> bool:
        """Whether the daemon still runs."""
        if self.process is not None:
            return self.process.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True


class MountManager:
    """Creates, lists and removes mounts; polls them; publishes learned prefetch lists."""

    def __init__(self, config: ChunkFuseConfig, bus: Bus | None) -> None:
        self.config = config
        self.bus = bus
        self.owner = f"agent:{config.node_name}"
        self.run_dir = config.run_dir
        self.mounts: dict[str, ManagedMount] = {}
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._kv: KeyValue | None = None
        self._standby: Standby | None = None
        self._reapers: set[asyncio.Task[Any]] = set()
        # Image reference (and backend) -> (manifest digest, when a mount last found it): the learned list's
        # key without a manifest request through the mirror on every mount (tags move: briefly trusted).
        self._digests: dict[tuple[str, str], tuple[str, float]] = {}
        self._kept: dict[str, ManagedMount] = {}

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt our live mounts and start polling."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for record in list_records(self.run_dir):
            if record.owner == self.owner:
                self._adopt_record(record)
        for kept in self._kept.values():
            kept.leases = sum(1 for m in self.mounts.values() if m.is_bind and m.kept_key == kept.kept_key)
            if kept.leases == 0:
                kept.leases = 1  # _release() counts it down and starts the keep period.
                self._release(kept)
        self._poll_task = asyncio.create_task(self._poll_forever(), name="mount-poll")
        self._refill_standby()

    async def stop(self) -> None:
        """Stop polling (and unmount everything when configured to)."""
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        if self.config.unmount_on_shutdown:
            for mount_id in list(self.mounts):
                with contextlib.suppress(Exception):
                    await self.delete(mount_id, lazy=True)
        # Kept image mounts nobody uses are this agent's cache, not anyone's mounts: they end with it.
        for key, kept in list(self._kept.items()):
            if kept.expiry is not None:
                kept.expiry.cancel()
            if kept.leases == 0:
                del self._kept[key]
                with contextlib.suppress(Exception):
                    await self._end_daemon(kept, lazy=True)
        if self._standby is not None:
            await asyncio.to_thread(self._standby.release)
            self._standby = None
        await asyncio.gather(*self._reapers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _refill_standby(self) -> None:
        """Start the next standby daemon, unless switched off or one is waiting."""
        if not self.config.warm_standby or (self._standby is not None and self._standby.alive):
            return
        log_path = (self.run_dir or default_run_dir()) / "logs" / f"standby-{os.getpid()}-{time.monotonic_ns()}.log"
        try:
            self._standby = start_standby(log_path)
        except OSError as exc:
            logger.warning("cannot start a standby mount daemon: %s", exc)
            self._standby = None

    def standby_state(self) -> dict[str, Any]:
        """Whether a warm daemon waits for the next mount (so a client can tell a warm node from a cold one)."""
        standby = self._standby
        return {
            "enabled": self.config.warm_standby,
            "ready": standby is not None and standby.alive and standby.poll_warm(),
            "pid": standby.process.pid if standby is not None else None,
        }

    def kept_state(self) -> list[dict[str, Any]]:
        """The images kept mounted: where, by which daemon, how many mounts show each now."""
        return [
            {"image": m.image, "digest": m.digest, "mountpoint": str(m.mountpoint), "pid": m.pid, "in_use": m.leases}
            for m in self._kept.values()
        ]

    def _take_standby(self) -> Standby | None:
        standby, self._standby = self._standby, None
        return standby if standby is not None and standby.alive else None

    def _adopt_record(self, record: MountRecord) -> None:
        """Take over a live mount this agent made before it restarted: plain, kept, or a bind of a kept one."""
        kept_root = (self.run_dir or default_run_dir()) / "kept"
        mount = ManagedMount(
            id=record.id,
            image=record.image,
            digest=record.digest,
            mountpoint=record.mountpoint,
            pid=record.pid,
            control_socket=record.control_socket,
            created_at=record.started_at,
        )
        if record.shared_from is not None:
            if not is_mounted(record.mountpoint):  # Taken off while the agent was away.
                self._remove_bind_record(record.id)
                return
            mount.is_bind, mount.kept_key = True, record.shared_from.parent.name
            self.mounts[record.id] = mount
        elif record.mountpoint.parent.parent == kept_root:
            mount.kept_key = record.mountpoint.parent.name
            self._kept[mount.kept_key] = mount
        else:
            self.mounts[record.id] = mount
        logger.info("adopted mount %s of %s at %s (pid %d)", record.id, record.image, record.mountpoint, record.pid)

    def _remove_bind_record(self, mount_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            record_path(self.run_dir or default_run_dir(), mount_id).unlink()

    # -- learned prefetch ---------------------------------------------------------------------------

    async def _bucket(self) -> KeyValue | None:
        if not self.config.learned_prefetch or self.bus is None or not self.bus.is_connected:
            return None
        if self._kv is None:
            try:
                self._kv = await learned.bucket(self.bus.nc, replicas=self.config.nats.replicas)
            except Exception as exc:
                logger.warning("learned prefetch bucket unavailable: %s", exc)
                return None
        return self._kv

    async def _learned_for(self, image: str, config: MountConfig) -> list[int] | None:
        """The learned list for the image this reference names now (None when unknown or off)."""
        if not config.learned_prefetch.enable:
            return None
        kv = await self._bucket()
        if kv is None:
            return None
        digest = await self._resolve_digest(image, config)
        if digest is None:
            return None
        try:
            found = await learned.load(kv, digest)
        except Exception as exc:
            logger.warning("reading the learned prefetch list of %s failed: %s", digest, exc)
            return None
        return found.chunks if found else None

    async def _resolve_digest(self, image: str, config: MountConfig) -> str | None:
        """The image's manifest digest (for the KV key), through the same backend the daemon will use."""
        ref = registry_ref(image)
        if ref.digest:
            return ref.digest
        known = self._digests.get(_digest_key(image, config))
        if known is not None and time.monotonic() - known[1] < DIGEST_TRUST_SECONDS:
            return known[0]
        backend = RegistryBackend(config.backend, ref)
        try:
            await backend.open()

            async def fetch(desc: Descriptor | None) -> tuple[bytes, str | None]:
                return await backend.get_manifest(ref.reference if desc is None else desc.digest)

            async def read_small(desc: Descriptor) -> bytes:
                return await backend.get_blob(desc.digest, desc.size)

            resolved = await resolve_image(str(ref), fetch, read_small, DEFAULT_PLATFORM)
            return resolved.digest
        except Exception as exc:
            logger.info("cannot resolve %s for learned prefetch: %s", image, exc)
            return None
        finally:
            await backend.close()

    async def _publish_trace(self, mount: ManagedMount, trace: dict[str, Any]) -> None:
        kv = await self._bucket()
        if kv is None:
            return
        chunks = [int(i) for i in trace.get("chunks", [])]
        mount.trace_published = True
        kept = self._kept.get(mount.kept_key or "")
        if kept is not None:
            kept.trace_published = True  # Its binds, now and later, have nothing more to publish.
        if not chunks:
            return
        record_seconds = mount.config.learned_prefetch.record_seconds if mount.config else 0.0
        entry = learned.LearnedList(
            image_digest=mount.digest, chunks=chunks, recorded_by=self.config.node_name, record_seconds=record_seconds
        )
        stored = await learned.publish(kv, entry)
        logger.info(
            "learned prefetch list of %s: %d chunks %s",
            mount.digest,
            len(chunks),
            "published" if stored else "not published (one exists)",
        )

    # -- mounts -------------------------------------------------------------------------------------

    def mount_config(self, document: dict[str, Any] | None) -> MountConfig:
        """A request's config (native or nydusd) with this node's defaults for what it leaves out."""
        try:
            config = mount_config_from_document(document or {}, "request config")
        except ConfigError as exc:
            # At this edge a bad config is the caller's mistake, not the agent's.
            raise InvalidRequest(exc.message) from None
        updates: dict[str, Any] = {}
        given = document or {}
        device = given.get("device")
        names_cache = "cache" in given or (isinstance(device, dict) and "cache" in device)
        if not names_cache:
            cache = config.cache.model_copy(
                update={"work_dir": self.config.effective_cache_dir, "size_limit": self.config.cache_size_limit}
            )
            updates["cache"] = cache
        # An explicit empty list ("mirrors: []") means straight to the registry: only silence gets the node's.
        if not config.backend.mirrors and self.config.mirror_url and not _names_mirrors(given):
            updates["backend"] = config.backend.model_copy(
                update={"mirrors": [MirrorConfig(host=self.config.mirror_url)]}
            )
        return config.model_copy(update=updates) if updates else config

    async def create(
        self,
        image: str,
        mountpoint: Path,
        document: dict[str, Any] | None,
        platform: str = "linux/amd64",
        *,
        mirror: str | None = None,
        insecure: bool = False,
    ) -> ManagedMount:
        """Mount ``image`` at ``mountpoint``; returns once the mount is ready.

        ``mirror`` and ``insecure`` are the CLI's shortcuts, applied over the config.
        """
        if not mountpoint.is_absolute():
            raise InvalidRequest(f"mount point {mountpoint} must be an absolute path")
        config = self.mount_config(document)
        if mirror or insecure:
            try:
                config = config.with_shortcuts(mirror=mirror, insecure=insecure)
            except ValueError as exc:
                raise InvalidRequest(f"mirror {mirror!r}: {exc}") from None
        key = _keep_key(image, config, platform) if self.config.keep_mounts_seconds > 0 else None
        if key is not None:
            async with self._lock:
                self._check_free(mountpoint)
                kept = self._live_kept(key)
                if kept is not None:
                    return await self._bind(kept, mountpoint)
        learned_chunks = await self._learned_for(image, config)
        spec_args: dict[str, Any] = {
            "image": image,
            "mountpoint": mountpoint if key is None else self._kept_path(key),
            "config": config,
            "platform": platform,
            "learned_chunks": learned_chunks,
            "owner": self.owner,
        }
        if self.run_dir is not None:
            spec_args["run_dir"] = self.run_dir
        spec = MountSpec(**spec_args)
        async with self._lock:
            self._check_free(mountpoint)
            if key is not None:
                kept = self._live_kept(key)
                if kept is not None:  # Another request mounted the image while we looked up its list.
                    return await self._bind(kept, mountpoint)
                spec.mountpoint.mkdir(parents=True, exist_ok=True)
            log_path = spec.run_dir / "logs" / f"{spec.id}.log"
            standby = self._take_standby()
            try:
                started = await asyncio.to_thread(
                    start_daemon, spec, log_path=log_path, timeout=self.config.mount_timeout, standby=standby
                )
            finally:
                self._refill_standby()
            mount = ManagedMount(
                id=spec.id,
                image=image,
                digest=started.digest,
                mountpoint=started.spec.mountpoint,
                pid=started.pid,
                control_socket=spec.control_socket,
                created_at=time.time(),
                config=config,
                process=started.process,
                ready_seconds=started.ready_seconds,
                image_config=started.image_config,
                learned_given=len(learned_chunks) if learned_chunks is not None else None,
                kept_key=key,
            )
            # What the daemon mounted is what the reference names now; a moved tag corrects the cache here.
            self._digests[_digest_key(image, config)] = (mount.digest, time.monotonic())
            if key is not None:
                self._kept[key] = mount
                logger.info("mounted %s for keeping at %s (pid %d)", image, mount.mountpoint, mount.pid)
                return await self._bind(mount, mountpoint)
            self.mounts[mount.id] = mount
        # Stats are for /metrics and the API: the caller waiting for its mount need not wait for them.
        self._background(self.refresh(mount), f"refresh-{mount.id}")
        logger.info("mounted %s at %s (mount %s, pid %d)", image, mountpoint, mount.id, mount.pid)
        return mount

    def _check_free(self, mountpoint: Path) -> None:
        if any(m.mountpoint == mountpoint for m in self.mounts.values()):
            raise InvalidRequest(f"{mountpoint} is already mounted by this agent")

    def _kept_path(self, key: str) -> Path:
        return (self.run_dir or default_run_dir()) / "kept" / key / "mnt"

    def _live_kept(self, key: str) -> ManagedMount | None:
        """The kept mount of ``key`` if its daemon still serves it (forgotten otherwise)."""
        kept = self._kept.get(key)
        if kept is None:
            return None
        if kept.alive and is_mounted(kept.mountpoint):
            return kept
        del self._kept[key]
        if kept.expiry is not None:
            kept.expiry.cancel()
        return None

    async def _bind(self, kept: ManagedMount, mountpoint: Path) -> ManagedMount:
        """Show the kept mount at ``mountpoint`` too (called with the lock held)."""
        started = time.monotonic()
        try:
            await asyncio.to_thread(bind_mount, kept.mountpoint, mountpoint)
        except OSError as exc:
            raise InvalidRequest(f"cannot mount {kept.image} at {mountpoint}: {exc.strerror}") from None
        if kept.expiry is not None:
            kept.expiry.cancel()
            kept.expiry = None
        kept.leases += 1
        bind = ManagedMount(
            id=new_mount_id(),
            image=kept.image,
            digest=kept.digest,
            mountpoint=mountpoint,
            pid=kept.pid,
            control_socket=kept.control_socket,
            created_at=time.time(),
            config=kept.config,
            process=kept.process,
            ready_seconds=time.monotonic() - started,
            image_config=kept.image_config,
            learned_given=kept.learned_given,
            trace_published=kept.trace_published,
            stats=kept.stats,
            kept_key=kept.kept_key,
            is_bind=True,
        )
        self.mounts[bind.id] = bind
        # A record like a daemon's, so an agent that restarts takes the bind over too.
        record = MountRecord(
            id=bind.id,
            pid=kept.pid,
            image=kept.image,
            digest=kept.digest,
            mountpoint=mountpoint,
            control_socket=kept.control_socket,
            owner=self.owner,
            started_at=bind.created_at,
            shared_from=kept.mountpoint,
        )
        await asyncio.to_thread(write_record_at, record_path(self.run_dir or default_run_dir(), bind.id), record)
        logger.info("mounted %s at %s (mount %s, kept mount pid %d)", kept.image, mountpoint, bind.id, kept.pid)
        return bind

    def _release(self, kept: ManagedMount) -> None:
        """One bind of ``kept`` is gone; the last one starts its keep period."""
        kept.leases = max(0, kept.leases - 1)
        if kept.leases == 0 and kept.expiry is None:
            kept.expiry = asyncio.get_running_loop().call_later(
                self.config.keep_mounts_seconds,
                lambda: self._background(self._expire(kept), f"expire-{kept.id}"),
            )

    async def _expire(self, kept: ManagedMount) -> None:
        async with self._lock:
            kept.expiry = None
            if kept.leases or kept.kept_key is None or self._kept.get(kept.kept_key) is not kept:
                return
            del self._kept[kept.kept_key]
        logger.info("kept mount of %s unused for %.0fs: unmounting", kept.image, self.config.keep_mounts_seconds)
        await self._end_daemon(kept, lazy=True)

    def get(self, mount_id: str) -> ManagedMount:
        """A mount by id (NotFound otherwise)."""
        mount = self.mounts.get(mount_id)
        if mount is None:
            raise NotFound(f"no mount {mount_id!r}")
        return mount

    async def delete(self, mount_id: str, *, lazy: bool = False) -> ManagedMount:
        """Unmount; the daemon's exit is awaited in the background (the caller's mount point is free now).

        A bind of a kept mount only takes the bind off: the image stays mounted for the next run.
        """
        mount = self.get(mount_id)
        if mount.is_bind:
            kept = self._kept.get(mount.kept_key or "")
            trace = await self._unpublished_trace(kept) if kept is not None else None
            try:
                await asyncio.to_thread(detach, mount.mountpoint)
            except OSError as exc:
                if is_mounted(mount.mountpoint):
                    raise DependencyUnavailable(f"cannot unmount {mount.mountpoint}: {exc.strerror}") from None
            self.mounts.pop(mount_id, None)
            self._remove_bind_record(mount_id)
            if kept is not None:
                if trace is not None:
                    self._background(self._publish_trace(kept, trace), f"learned-{mount_id}")
                self._release(kept)
            logger.info("unmounted %s (mount %s; the image stays mounted)", mount.mountpoint, mount_id)
            return mount
        await self._end_daemon(mount, lazy=lazy)
        self.mounts.pop(mount_id, None)
        return mount

    async def _end_daemon(self, mount: ManagedMount, *, lazy: bool) -> None:
        """Unmount a daemon's mount, publishing a recording it has not published; reap it in the background."""
        # A first cold start that ends inside its recording window: what it read is the image's start-up,
        # so publish it now (the daemon and its trace go with the unmount). Publishing is not waited for.
        trace = await self._unpublished_trace(mount)
        await asyncio.to_thread(unmount, mount.mountpoint, lazy=lazy)
        if trace is not None:
            self._background(self._publish_trace(mount, trace), f"learned-{mount.id}")
        # A daemon ends by itself once unmounted (shutting down its loop takes a while): waiting for it here
        # would only make every `damselfly run` slower. The reaper terminates one that does not end.
        self._background(
            asyncio.to_thread(wait_for_daemon, mount.mountpoint, mount.pid, mount.process), f"reap-{mount.id}"
        )
        logger.info("unmounted %s (mount %s)", mount.mountpoint, mount.id)

    def _background(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        async def logged() -> None:
            try:
                await work
            except Exception as exc:
                logger.warning("%s failed: %r", name, exc)

        task = asyncio.create_task(logged(), name=name)
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _unpublished_trace(self, mount: ManagedMount) -> dict[str, Any] | None:
        """The recording of a mount that is recording one and has not published it yet (None otherwise)."""
        # A mount given a learned list records none (daemon.py): no need to ask it on the unmount's path.
        if mount.trace_published or mount.learned_given is not None:
            return None
        if mount.config is not None and not mount.config.learned_prefetch.enable:
            return None
        trace = await self._control(mount, "/api/v1/trace")
        if not trace or not trace.get("recording") or not trace.get("chunks"):
            return None
        return trace

    # -- polling ------------------------------------------------------------------------------------

    async def drop_memory(self) -> int:
        """Every daemon of this agent (kept ones too) forgets the chunks it holds in memory; how many in all.

        For measurements of the disk cache (``echo 3 > /proc/sys/vm/drop_caches`` does not reach a
        process's own memory).
        """
        daemons = {m.pid: m for m in [*self.mounts.values(), *self._kept.values()]}
        answers = await asyncio.gather(
            *(self._control(m, "/api/v1/memory/drop", method="POST") for m in daemons.values())
        )
        return sum(int(answer.get("dropped_chunks", 0)) for answer in answers if answer)

    async def _control(self, mount: ManagedMount, path: str, method: str = "GET") -> dict[str, Any] | None:
        if self._session is None or not mount.control_socket.exists():
            return None
        connector = aiohttp.UnixConnector(path=str(mount.control_socket))
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.request(method, f"http://daemon{path}") as response,
            ):
                if response.status != 200:
                    return None
                body: dict[str, Any] = await response.json()
                return body
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def refresh(self, mount: ManagedMount) -> dict[str, Any]:
        """Fetch a mount's current stats (kept for /metrics)."""
        stats = await self._control(mount, "/api/v1/stats")
        if stats is not None:
            mount.stats = stats
        return mount.stats

    async def poll_once(self) -> None:
        """One round: reap ended daemons, refresh stats, publish finished recordings."""
        for key in list(self._kept):
            self._live_kept(key)
        for mount in list(self.mounts.values()):
            if not mount.alive:
                logger.warning("mount %s at %s ended (daemon %d gone)", mount.id, mount.mountpoint, mount.pid)
                self.mounts.pop(mount.id, None)
                continue
            if mount.is_bind and not await asyncio.to_thread(is_mounted, mount.mountpoint):
                # Taken off from outside (umount): the kept mount has one user less.
                logger.warning("mount %s at %s was unmounted from outside", mount.id, mount.mountpoint)
                self.mounts.pop(mount.id, None)
                self._remove_bind_record(mount.id)
                kept = self._kept.get(mount.kept_key or "")
                if kept is not None:
                    self._release(kept)
                continue
            await self.refresh(mount)
            learned_stats = mount.stats.get("learned", {})
            recorded = learned_stats and not learned_stats.get("given") and not learned_stats.get("recording")
            if recorded and not mount.trace_published:
                trace = await self._control(mount, "/api/v1/trace")
                if trace is not None and trace.get("complete"):
                    try:
                        await self._publish_trace(mount, trace)
                    except Exception as exc:
                        logger.warning("publishing the learned list of %s failed: %s", mount.digest, exc)

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                logger.exception("polling mounts failed")
            await asyncio.sleep(self.config.poll_seconds)


def _keep_key(image: str, config: MountConfig, platform: str) -> str:
    """Which requests may share one kept mount: the same image, config and platform (a short hash)."""
    material = "\0".join((image, platform, config.model_dump_json()))
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def _digest_key(image: str, config: MountConfig) -> tuple[str, str]:
    """What an image reference resolves through: the reference and the backend (registry, mirrors, auth)."""
    return image, config.backend.model_dump_json()


def _names_mirrors(document: dict[str, Any]) -> bool:
    """Whether a mount config (native or nydusd) says anything about mirrors."""
    backend = document.get("backend")
    if isinstance(backend, dict) and "mirrors" in backend:
        return True
    device = document.get("device")
    nydus_backend = device.get("backend") if isinstance(device, dict) else None
    nydus_config = nydus_backend.get("config") if isinstance(nydus_backend, dict) else None
    return isinstance(nydus_config, dict) and "mirrors" in nydus_config
