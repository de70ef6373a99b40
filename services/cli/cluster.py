"""``damselfly up``: a whole local cluster as supervised processes.

The supervisor starts NATS (unless an external URL is given), the scheduler, a seed-fetcher and N
peer nodes (registry-proxy + cache-store + chunk-fuse agent each), every service a child process with
its own YAML config in the workdir. A child that dies is logged and restarted with backoff; SIGINT or
SIGTERM stops every child (each also dies with the supervisor, through PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from shared.errors import DependencyUnavailable
from shared.nats_server import NatsServer, _die_with_parent
from shared.netutil import free_port, wait_for_port

logger = logging.getLogger("damselfly.up")

READY_TIMEOUT_SECONDS = 90.0


@dataclass
class ChildSpec:
    """One supervised process."""

    name: str
    module: str | None  # ``services.<x>`` run with ``python -m``; None for a raw command.
    config: dict[str, Any] = field(default_factory=dict)
    command: list[str] | None = None
    ready_url: str | None = None


@dataclass
class PeerEndpoints:
    """The URLs of one peer node."""

    name: str
    proxy: str
    upload: str
    agent: str


@dataclass
class ClusterPlan:
    """What `damselfly up` will run, and where everything will listen."""

    workdir: Path
    nats_url: str
    embedded_nats: NatsServer | None
    scheduler_url: str
    admin_token: str
    seed_fetcher_url: str
    seed_upload_url: str
    peers: list[PeerEndpoints]
    children: list[ChildSpec]

    def state(self) -> dict[str, Any]:
        """The state file's content."""
        return {
            "nats": self.nats_url,
            "scheduler": self.scheduler_url,
            "admin_token": self.admin_token,
            "seed_fetcher": self.seed_fetcher_url,
            "seed_upload": self.seed_upload_url,
            "peers": [vars(peer) for peer in self.peers],
            "workdir": str(self.workdir),
            "pid": os.getpid(),
        }


def _node_store(node_dir: Path) -> dict[str, str]:
    """The piece store every process of one node shares (one copy of each piece on the node's disk)."""
    pieces = node_dir / "pieces"
    return {"storage_dir": str(pieces), "database_url": f"sqlite:///{pieces / 'store.db'}"}


def _port(configured: int | None) -> int:
    return configured if configured else free_port()


def plan_cluster(
    workdir: Path,
    peers: int,
    origin: str,
    nats_url: str | None = None,
    database_url: str | None = None,
    scheduler_port: int | None = None,
    seed_port: int | None = None,
    peer_port_base: int | None = None,
    host: str = "127.0.0.1",
    prefetch: bool = True,
    admin_token: str | None = None,
) -> ClusterPlan:
    """Decide ports and configs for every process of a local cluster.

    The scheduler's admin API gets ``admin_token``, or a fresh random one, written to the state file.
    """
    admin_token = admin_token or secrets.token_urlsafe(24)
    workdir = workdir.resolve()
    embedded = None
    if nats_url is None:
        embedded = NatsServer(workdir / "nats", log_file=workdir / "logs" / "nats.log")
        nats_url = embedded.url
    common = {"host": host, "nats": {"url": nats_url}}
    children: list[ChildSpec] = []

    scheduler_port = _port(scheduler_port)
    scheduler_url = f"http://{host}:{scheduler_port}"
    scheduler_config: dict[str, Any] = {
        **common,
        "port": scheduler_port,
        "node_name": "scheduler",
        "workdir": str(workdir / "scheduler"),
        "api": {"token": admin_token},
    }
    if database_url:
        scheduler_config["database_url"] = database_url
    children.append(ChildSpec("scheduler", "services.piece_scheduler", scheduler_config, ready_url=scheduler_url))

    seed_port = _port(seed_port)
    seed_url = f"http://{host}:{seed_port}"
    seed_dir = workdir / "seed-0"
    seed_store = _node_store(seed_dir)
    seed_upload_port = free_port()
    seed_upload_url = f"http://{host}:{seed_upload_port}"
    children.append(
        ChildSpec(
            "seed-cache-store",
            "services.cache_store",
            {
                **common,
                **seed_store,
                "port": seed_upload_port,
                "node_name": "seed-0",
                "peer_id": "seed-0",
                "is_seed": True,
                "workdir": str(seed_dir),
            },
            ready_url=seed_upload_url,
        )
    )
    children.append(
        ChildSpec(
            "seed-fetcher",
            "services.seed_fetcher",
            {
                **common,
                **seed_store,
                "port": seed_port,
                "node_name": "seed-0",
                "seed_id": "seed-0",
                "workdir": str(seed_dir),
                "allowed_registries": [origin],
            },
            ready_url=seed_url,
        )
    )

    endpoints = []
    for index in range(peers):
        name = f"peer-{index}"
        node_dir = workdir / name
        if peer_port_base:
            proxy_port, upload_port, agent_port = (peer_port_base + 3 * index + offset for offset in range(3))
        else:
            proxy_port, upload_port, agent_port = free_port(), free_port(), free_port()
        proxy_url = f"http://{host}:{proxy_port}"
        upload_url = f"http://{host}:{upload_port}"
        agent_url = f"http://{host}:{agent_port}"
        node_common = {**common, "node_name": name, "workdir": str(node_dir)}
        node_store = _node_store(node_dir)
        children.append(
            ChildSpec(
                f"{name}-cache-store",
                "services.cache_store",
                {**node_common, **node_store, "port": upload_port, "peer_id": name, "proxy_url": proxy_url},
                ready_url=upload_url,
            )
        )
        children.append(
            ChildSpec(
                f"{name}-registry-proxy",
                "services.registry_proxy",
                {
                    **node_common,
                    **node_store,
                    "peer_id": name,
                    "port": proxy_port,
                    "registry_mirror": {"url": origin, "dynamic": True},
                    "prefetch": prefetch,
                    "allowed_registries": [origin],
                    "cache_store_url": upload_url,
                },
                ready_url=proxy_url,
            )
        )
        children.append(
            ChildSpec(
                f"{name}-chunk-fuse",
                "services.chunk_fuse",
                {**node_common, "port": agent_port, "mirror_url": proxy_url},
                ready_url=agent_url,
            )
        )
        endpoints.append(PeerEndpoints(name=name, proxy=proxy_url, upload=upload_url, agent=agent_url))

    return ClusterPlan(
        workdir=workdir,
        nats_url=nats_url,
        embedded_nats=embedded,
        scheduler_url=scheduler_url,
        admin_token=admin_token,
        seed_fetcher_url=seed_url,
        seed_upload_url=seed_upload_url,
        peers=endpoints,
        children=children,
    )


class SupervisedProcess:
    """A child kept running: restarted with backoff when it exits while the cluster is up."""

    def __init__(self, spec: ChildSpec, command: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.spec = spec
        self.command = command
        self.log_path = log_path
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.stopping = False
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the child and the task that restarts it."""
        await self._spawn()
        self._watch = asyncio.create_task(self._watch_loop(), name=f"watch-{self.spec.name}")

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command,
                stdout=log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        logger.info("started %s (pid %s)", self.spec.name, self.process.pid)

    async def _watch_loop(self) -> None:
        backoff = 0.5
        while True:
            assert self.process is not None
            started = time.monotonic()
            code = await self.process.wait()
            if self.stopping:
                return
            logger.warning(
                "%s exited with code %s; restarting in %.1fs (log: %s)", self.spec.name, code, backoff, self.log_path
            )
            await asyncio.sleep(backoff)
            if self.stopping:
                return
            # A child that ran a good while before dying starts again quickly; a crash loop backs off.
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 10.0)
            self.restarts += 1
            await self._spawn()

    async def stop(self, timeout: float) -> None:
        """SIGTERM the child, SIGKILL it after ``timeout``."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            logger.warning("%s did not stop in %.0fs; killing it", self.spec.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


class LocalCluster:
    """Runs a :class:`ClusterPlan` until told to stop."""

    def __init__(self, plan: ClusterPlan, state_file: Path | None = None) -> None:
        self.plan = plan
        self.state_file = state_file
        self.children: list[SupervisedProcess] = []
        self.nats_process: SupervisedProcess | None = None
        self._stop = asyncio.Event()

    def _write_configs(self) -> None:
        config_dir = self.plan.workdir / "configs"
        config_dir.mkdir(parents=True, exist_ok=True)
        config_dir.chmod(0o700)  # The scheduler's holds the admin token.
        for spec in self.plan.children:
            (config_dir / f"{spec.name}.yaml").write_text(yaml.safe_dump(spec.config, sort_keys=True))

    def _child_env(self) -> dict[str, str]:
        # Configs are complete files: inherited DAMSELFLY_* variables would override them for every child.
        env = {key: value for key, value in os.environ.items() if not key.startswith("DAMSELFLY_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def start(self) -> None:
        """Start NATS (embedded), then every service, and wait until all are ready."""
        self.plan.workdir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        logs = self.plan.workdir / "logs"
        env = self._child_env()
        embedded = self.plan.embedded_nats
        if embedded is not None:
            embedded.store_dir.mkdir(parents=True, exist_ok=True)
            nats_spec = ChildSpec("nats", None, command=embedded.command())
            self.nats_process = SupervisedProcess(nats_spec, embedded.command(), logs / "nats.log", env)
            await self.nats_process.start()
            if not await asyncio.to_thread(wait_for_port, embedded.host, embedded.port, 15.0):
                raise DependencyUnavailable(f"embedded NATS did not start; see {logs / 'nats.log'}")
        for spec in self.plan.children:
            command = [
                sys.executable,
                "-m",
                str(spec.module),
                "--config",
                str(self.plan.workdir / "configs" / f"{spec.name}.yaml"),
            ]
            child = SupervisedProcess(spec, command, logs / f"{spec.name}.log", env)
            await child.start()
            self.children.append(child)
        await self.wait_ready(READY_TIMEOUT_SECONDS)
        if self.state_file is not None:
            write_state_file(self.state_file, self.plan.state())

    async def wait_ready(self, timeout: float) -> None:
        """Poll every service's /readyz until all answer 200."""
        deadline = time.monotonic() + timeout
        pending = {spec.name: f"{spec.ready_url}/readyz" for spec in self.plan.children if spec.ready_url}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while pending:
                for name, url in list(pending.items()):
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(url) as response:
                            if response.status == 200:
                                logger.info("%s is ready", name)
                                del pending[name]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise DependencyUnavailable(
                        f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))} "
                        f"(logs in {self.plan.workdir / 'logs'})"
                    )
                await asyncio.sleep(0.25)

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut everything down."""
        self._stop.set()

    async def run(self) -> None:
        """Start, wait for SIGINT/SIGTERM, then stop everything."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.request_stop)
        try:
            start = asyncio.create_task(self.start())
            stop_wait = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if start in done:
                start.result()  # Raise a startup failure.
                logger.info("cluster is up; Ctrl-C to stop")
                await stop_wait
            else:
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await start
        finally:
            await self.stop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the services (all at once), then NATS; remove the state file."""
        logger.info("stopping the cluster")
        await asyncio.gather(*(child.stop(timeout) for child in self.children))
        if self.nats_process is not None:
            await self.nats_process.stop(timeout)
        if self.state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()


def write_state_file(path: Path, state: dict[str, Any]) -> None:
    """Write the state atomically, so a reader never sees half a file; only its owner may read it (token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(orjson.dumps(state, option=orjson.OPT_INDENT_2))
    temporary.replace(path)
