"""Lazy mounts for real: FUSE, a docker-registry origin, the python image converted, `damselfly run`.

Every mount is made by the real CLI (``damselfly mount`` / ``run``: a daemon process, libfuse3, the kernel)
and ended in a ``finally`` (``damselfly umount``, then ``fusermount3 -u -z``), so no test leaves a mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.chunk_fuse.control import mount_stats
from services.chunk_fuse.rundir import is_mounted
from services.cli.cluster import LocalCluster, plan_cluster
from shared.image_format import ConversionOptions
from shared.netutil import free_port
from shared.oci import ConvertSettings, convert_image, open_store, parse_reference
from tests.support.images import OciImage, read_layout_config
from tests.support.plugin import PushedImage
from tests.support.registry import RegistryServer

pytestmark = pytest.mark.integration

#: What `python3 -V` opens in the python image (shared/images/README.md).
PYTHON_V_OPENED_BYTES = 10_570_000
LAZY_TAG = "3.11-lazy"
CLI = (sys.executable, "-m", "services.cli")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class LazyImage:
    """A converted image in a registry."""

    registry: RegistryServer
    repository: str
    tag: str

    @property
    def reference(self) -> str:
        return f"{self.registry.host}/{self.repository}:{self.tag}"


def convert(source: str, target: str, options: ConversionOptions | None = None) -> None:
    """`damselfly convert` as a library call (plain-HTTP registries)."""

    async def work() -> None:
        async with aiohttp.ClientSession() as session:
            await convert_image(
                open_store(parse_reference(source), session, insecure=True),
                open_store(parse_reference(target), session, insecure=True),
                ConvertSettings(options=options or ConversionOptions()),
            )

    asyncio.run(work())


@pytest.fixture(scope="module")
def lazy_python(python_image_in_registry: PushedImage) -> LazyImage:
    """The python image converted next to itself, as library/python:3.11-lazy."""
    registry = python_image_in_registry.registry
    convert(python_image_in_registry.reference, f"{registry.host}/library/python:{LAZY_TAG}")
    return LazyImage(registry, "library/python", LAZY_TAG)


@pytest.fixture(scope="module")
def unpacked_python(python_image_layout: OciImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The python image fully unpacked by umoci (as root: owners kept), the OCIv1 way."""
    work = tmp_path_factory.mktemp("umoci")
    layout = work / "layout"
    # umoci takes a lock inside the layout; the shared one is read-only.
    shutil.copytree(python_image_layout.layout, layout)
    bundle = work / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{python_image_layout.tag}", str(bundle)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield bundle / "rootfs"
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(autouse=True)
def private_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Mount records, sockets and daemon logs of this test only."""
    directory = tmp_path / "run"
    monkeypatch.setenv("DAMSELFLY_RUN_DIR", str(directory))
    return directory


def damselfly(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real CLI."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


def no_damselfly_mounts() -> bool:
    """No mount of this test is left: none under its directory (its run dir is private, see below).

    Only this test's: tests in other files run beside it and have mounts of their own.
    """
    mine = str(Path(os.environ["DAMSELFLY_RUN_DIR"]).parent)
    with open("/proc/self/mountinfo") as mountinfo:
        return not any(mine in line for line in mountinfo)


@contextlib.contextmanager
def mounted(image: str, mountpoint: Path, config: Path, *extra: str) -> Iterator[Path]:
    """`damselfly mount` ... `damselfly umount`, with a lazy fusermount3 as the last resort."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    result = damselfly("mount", image, str(mountpoint), "--config", str(config), "--insecure", *extra)
    assert result.returncode == 0, result.stderr
    try:
        yield mountpoint
    finally:
        done = damselfly("umount", str(mountpoint), "--lazy")
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        assert done.returncode == 0, done.stderr


def blob_bytes(registry: RegistryServer, since: int) -> int:
    """Bytes the origin sent for GETs since a mark (manifests, configs, bootstraps, ranges)."""
    return sum(r.bytes_sent for r in registry.access_log(since=since) if r.method == "GET" and r.status in (200, 206))


# -- damselfly run ---------------------------------------------------------------------------------------


def chroot_run(rootfs: Path, env: dict[str, str], command: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["chroot", str(rootfs), *command], env=env, capture_output=True, timeout=120, check=False)


@pytest.mark.slow
def test_run_prints_what_a_chroot_into_the_unpacked_image_prints(
    lazy_python: LazyImage, unpacked_python: Path, python_image_layout: OciImage, tmp_path: Path
) -> None:
    config = read_layout_config(python_image_layout)["config"]
    assert isinstance(config, dict)
    env = dict(item.split("=", 1) for item in config.get("Env", []))
    env.setdefault("HOME", "/root")
    cold = write_config(tmp_path / "cold.json", {"cache": {"work_dir": str(tmp_path / "cache")}})
    registry = lazy_python.registry
    commands = [["python3", "-V"], ["python3", "-c", "import json, http.client; print(1)"]]
    for index, command in enumerate(commands):
        mark = registry.mark()
        started = time.monotonic()
        lazy = subprocess.run(
            [*CLI, "run", "--insecure", "--config", str(cold), lazy_python.reference, "--", *command],
            capture_output=True,
            timeout=300,
            check=False,
        )
        seconds = time.monotonic() - started
        fetched = blob_bytes(registry, mark)
        reference = chroot_run(unpacked_python, env, command)
        assert (lazy.returncode, lazy.stdout, lazy.stderr) == (reference.returncode, reference.stdout, reference.stderr)
        print(f"\n{' '.join(command)}: {lazy.stdout!r}, {fetched:,} bytes from the origin, {seconds:.2f}s")
        if index == 0:
            # Cold: manifest, config, bootstrap and the chunks of what python3 -V opens.
            assert fetched <= 1.5 * PYTHON_V_OPENED_BYTES, fetched
            print(f"python3 -V cold: {fetched / PYTHON_V_OPENED_BYTES:.2f}x the bytes of the files it opens")
    assert no_damselfly_mounts()


def test_run_passes_on_the_exit_status_and_cleans_up_on_failure(lazy_python: LazyImage, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.json", {"cache": {"work_dir": str(tmp_path / "cache")}})
    base = ["run", "--insecure", "--config", str(config), lazy_python.reference, "--"]
    failed = damselfly(*base, "sh", "-c", "echo out; echo err >&2; touch /tmp/written; exit 7")
    assert (failed.returncode, failed.stdout, failed.stderr) == (7, "out\n", "err\n")
    missing = damselfly(*base, "no-such-command")
    assert missing.returncode == 127
    assert "not found" in missing.stderr
    # The overlay took the write; the image and the host did not.
    wrote = damselfly(*base, "sh", "-c", "echo x > /usr/local/new && cat /usr/local/new && id -u && pwd")
    assert (wrote.returncode, wrote.stdout) == (0, "x\n0\n/\n"), wrote.stderr
    assert no_damselfly_mounts()


def test_ctrl_c_during_a_run_unmounts_everything(lazy_python: LazyImage, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.json", {"cache": {"work_dir": str(tmp_path / "cache")}})
    process = subprocess.Popen(
        [*CLI, "run", "--insecure", "--config", str(config), lazy_python.reference, "--", "sh", "-c", "sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        _wait_for(lambda: _has_process(process.pid, "sleep"), 120, "the command to start")
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        code = process.wait(60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    assert code == 128 + signal.SIGINT
    assert no_damselfly_mounts()


# -- the mounted tree ------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, os.stat_result]:
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, root)] = os.lstat(path)
    return out


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise


@pytest.mark.slow
def test_every_file_of_the_mounted_image_matches_the_unpacked_image(
    lazy_python: LazyImage, unpacked_python: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "c.json", {"cache": {"work_dir": str(tmp_path / "cache")}, "digest_validate": True}
    )
    with mounted(lazy_python.reference, tmp_path / "mnt", config) as mnt:
        started = time.monotonic()
        lazy_tree = _tree(mnt)
        walk_seconds = time.monotonic() - started
        expected_tree = _tree(unpacked_python)
        assert sorted(lazy_tree) == sorted(expected_tree)
        links_lazy: dict[int, set[str]] = {}
        links_expected: dict[tuple[int, int], set[str]] = {}
        read_bytes = 0
        read_seconds = 0.0
        for rel, want in expected_tree.items():
            got = lazy_tree[rel]
            where = f"/{rel}"
            assert stat.S_IFMT(got.st_mode) == stat.S_IFMT(want.st_mode), where
            assert (stat.S_IMODE(got.st_mode), got.st_uid, got.st_gid) == (
                stat.S_IMODE(want.st_mode),
                want.st_uid,
                want.st_gid,
            ), where
            if not stat.S_ISDIR(want.st_mode):
                assert got.st_mtime_ns // 10**9 == want.st_mtime_ns // 10**9, where
                assert got.st_nlink == want.st_nlink, where
            assert _xattrs(str(mnt / rel)) == _xattrs(str(unpacked_python / rel)), where
            if stat.S_ISLNK(want.st_mode):
                assert os.readlink(mnt / rel) == os.readlink(unpacked_python / rel), where
            elif stat.S_ISCHR(want.st_mode) or stat.S_ISBLK(want.st_mode):
                assert got.st_rdev == want.st_rdev, where
            elif stat.S_ISREG(want.st_mode):
                assert got.st_size == want.st_size, where
                links_lazy.setdefault(got.st_ino, set()).add(rel)
                links_expected.setdefault((want.st_dev, want.st_ino), set()).add(rel)
                t = time.monotonic()
                data = (mnt / rel).read_bytes()
                read_seconds += time.monotonic() - t
                read_bytes += len(data)
                assert data == (unpacked_python / rel).read_bytes(), where
        assert sorted(map(sorted, links_lazy.values())) == sorted(map(sorted, links_expected.values()))
        stats = mount_stats(mnt)
    print(
        f"\nwalk+lstat of {len(lazy_tree):,} entries: {walk_seconds:.2f}s; read {read_bytes / 1e6:.1f} MB cold in "
        f"{read_seconds:.1f}s = {read_bytes / read_seconds / 1e6:.1f} MB/s; "
        f"{stats['backend']['bytes_fetched']:,} bytes fetched in {stats['backend']['requests']} requests"
    )
    assert stats["reads"]["digest_failures"] == 0


def test_a_second_mount_reads_from_the_disk_cache(lazy_python: LazyImage, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.json", {"cache": {"work_dir": str(tmp_path / "cache")}})
    registry = lazy_python.registry
    target = "usr/lib/x86_64-linux-gnu/libcrypto.so.3"
    with mounted(lazy_python.reference, tmp_path / "one", config) as mnt:
        first = (mnt / target).read_bytes()
        cold = mount_stats(mnt)
    assert cold["reads"]["chunks_fetched"] > 0
    mark = registry.mark()
    with mounted(lazy_python.reference, tmp_path / "two", config) as mnt:
        assert (mnt / target).read_bytes() == first
        warm = mount_stats(mnt)
    ranges = [r for r in registry.access_log(since=mark) if r.status == 206]
    assert ranges == [], "a warm mount fetches no chunk"
    assert warm["bootstrap"]["from_cache"] is True
    assert warm["reads"]["chunks_fetched"] == 0
    assert warm["reads"]["chunks_from_disk"] > 0


# -- corruption on the way ------------------------------------------------------------------------------


class BitFlipper:
    """An HTTP proxy in front of a registry that flips one bit in the middle of every 206 (chunk) body."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.flipped = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("range", "accept", "authorization")}
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, self.upstream + request.path_qs, headers=headers) as reply,
        ):
            body = bytearray(await reply.read())
            if reply.status == 206 and body:
                body[len(body) // 2] ^= 0x10
                self.flipped += 1
            passed = {k: v for k, v in reply.headers.items() if k in ("Content-Type", "Docker-Content-Digest")}
            return web.Response(body=bytes(body), status=reply.status, headers=passed)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> BitFlipper:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def test_a_chunk_corrupted_on_the_way_is_detected_and_the_read_fails_with_eio(
    lazy_python: LazyImage, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "c.json", {"cache": {"work_dir": str(tmp_path / "cache")}, "digest_validate": True, "amplify_io": 0}
    )
    with BitFlipper(lazy_python.registry.url) as flipper:
        image = f"127.0.0.1:{flipper.port}/{lazy_python.repository}:{lazy_python.tag}"
        with mounted(image, tmp_path / "mnt", config) as mnt:
            with pytest.raises(OSError) as caught:
                (mnt / "usr/bin/python3.11").read_bytes()
            assert caught.value.errno == errno.EIO
            stats = mount_stats(mnt)
            # Metadata never needs a chunk, so the tree is still there.
            assert (mnt / "etc").is_dir()
    assert flipper.flipped > 0
    assert stats["reads"]["digest_failures"] >= 1
    assert stats["reads"]["read_errors"] >= 1
    assert not any((tmp_path / "cache" / "chunks").rglob("*[0-9a-f]")), "a corrupt chunk is never cached"


# -- mirror failover -------------------------------------------------------------------------------------


def _has_process(session: int, name: str) -> bool:
    """Whether a process named ``name`` runs in session ``session``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session and (entry / "comm").read_text().strip() == name:
                    return True
    return False


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
async def test_the_mirror_killed_mid_run_reads_go_to_the_origin_and_return_to_the_mirror(
    lazy_python: LazyImage, tmp_path: Path
) -> None:
    registry = lazy_python.registry
    plan = plan_cluster(tmp_path / "cluster", peers=1, origin=registry.url)
    cluster = LocalCluster(plan)
    try:
        await cluster.start()
        [proxy_process] = [c for c in cluster.children if c.spec.name == "peer-0-registry-proxy"]

        def kill_proxy() -> None:
            assert proxy_process.process is not None
            os.kill(proxy_process.process.pid, signal.SIGKILL)

        # The reads block (FUSE): they run in a thread while this loop keeps supervising the cluster.
        await asyncio.to_thread(reads_across_a_mirror_death, lazy_python, plan.peers[0].proxy, tmp_path, kill_proxy)
    finally:
        await cluster.stop()


def reads_across_a_mirror_death(lazy: LazyImage, proxy: str, tmp_path: Path, kill_proxy: Any) -> None:
    """Read through the mirror, kill it, read on (origin), wait for it to come back, read through it again."""
    config = write_config(
        tmp_path / "c.json",
        {
            "cache": {"work_dir": str(tmp_path / "cache")},
            "backend": {"mirrors": [{"host": proxy, "health_check_interval": 0.3}], "timeout": 30},
            "amplify_io": 0,
        },
    )
    files = ["usr/bin/python3.11", "usr/lib/x86_64-linux-gnu/libcrypto.so.3", "usr/bin/perl"]
    with mounted(lazy.reference, tmp_path / "mnt", config) as mnt:
        (mnt / files[0]).read_bytes()
        before = mount_stats(mnt)["backend"]
        assert before["mirror_requests"] > 0 and before["origin_requests"] == 0

        kill_proxy()
        data = (mnt / files[1]).read_bytes()
        during = mount_stats(mnt)
        assert during["backend"]["origin_requests"] > 0, "reads went on from the origin"
        assert during["backend"]["mirror_failovers"] >= 1
        assert len(data) == os.stat(mnt / files[1]).st_size

        # The supervisor restarts the proxy; its ping answers again and traffic returns to it.
        _wait_for(lambda: mount_stats(mnt)["mirrors"][0]["healthy"], 60, "the mirror to be healthy again")
        mirror_before = mount_stats(mnt)["backend"]["mirror_requests"]
        (mnt / files[2]).read_bytes()
        assert mount_stats(mnt)["backend"]["mirror_requests"] > mirror_before


# -- metadata of a crafted image -------------------------------------------------------------------------


def _layer(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


Entry = tuple[tarfile.TarInfo, bytes | None]


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **fields: Any) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = fields.pop("mtime", 1_700_000_000)
    info.mode = fields.pop("mode", 0o644)
    for key, value in fields.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
    return info, data


def crafted_layout(directory: Path) -> OciImage:
    """An OCI layout of one layer with every kind of entry the format knows."""
    content = b"hello lazy world\n" * 1000
    xattr_file = _entry("app/xattr.txt", data=b"x")
    xattr_file[0].pax_headers = {"SCHILY.xattr.user.damselfly": "yes", "SCHILY.xattr.user.empty": ""}
    layer = _layer(
        [
            _entry("app", tarfile.DIRTYPE, mode=0o1777),
            _entry("app/data.bin", data=content, uid=1234, gid=4321),
            _entry("app/setuid", data=b"#!/bin/sh\n", mode=0o4755),
            _entry("app/hardlink", tarfile.LNKTYPE, linkname="app/data.bin"),
            _entry("app/abs-link", tarfile.SYMTYPE, linkname="/app/data.bin", mode=0o777),
            _entry("app/rel-link", tarfile.SYMTYPE, linkname="../app/data.bin", mode=0o777),
            _entry("app/fifo", tarfile.FIFOTYPE),
            _entry("app/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
            _entry("app/empty", data=b""),
            xattr_file,
        ]
    )
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    layer_digest, layer_size = put(layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/app/setuid"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    config_digest, config_size = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_size,
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}
            ],
        }
    ).encode()
    manifest_digest, manifest_size = put(manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest,
                        "size": manifest_size,
                        "annotations": {"org.opencontainers.image.ref.name": "v1"},
                    }
                ],
            }
        )
    )
    return OciImage(directory, "v1")


def test_metadata_hard_links_xattrs_and_special_files(registry: RegistryServer, tmp_path: Path) -> None:
    layout = crafted_layout(tmp_path / "layout")
    convert(layout.ref, f"{registry.host}/test/crafted:lazy", ConversionOptions(chunk_size=4096))
    config = write_config(tmp_path / "c.json", {"cache": {"work_dir": str(tmp_path / "cache")}})
    with mounted(f"{registry.host}/test/crafted:lazy", tmp_path / "mnt", config) as mnt:
        app = mnt / "app"
        assert sorted(os.listdir(app)) == sorted(
            ["data.bin", "setuid", "hardlink", "abs-link", "rel-link", "fifo", "null", "empty", "xattr.txt"]
        )
        data = os.lstat(app / "data.bin")
        assert (data.st_uid, data.st_gid, data.st_size, data.st_nlink) == (1234, 4321, 17000, 2)
        assert data.st_mtime == 1_700_000_000
        assert os.lstat(app / "hardlink").st_ino == data.st_ino
        assert (app / "hardlink").read_bytes() == b"hello lazy world\n" * 1000
        assert stat.S_IMODE(os.lstat(app).st_mode) == 0o1777
        assert stat.S_IMODE(os.lstat(app / "setuid").st_mode) == 0o4755
        assert os.readlink(app / "abs-link") == "/app/data.bin"
        assert os.readlink(app / "rel-link") == "../app/data.bin"
        assert stat.S_ISFIFO(os.lstat(app / "fifo").st_mode)
        null = os.lstat(app / "null")
        assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
        assert (app / "empty").read_bytes() == b""
        assert sorted(os.listxattr(app / "xattr.txt")) == ["user.damselfly", "user.empty"]
        assert os.getxattr(app / "xattr.txt", "user.damselfly") == b"yes"
        assert os.getxattr(app / "xattr.txt", "user.empty") == b""
        with pytest.raises(OSError) as nodata:
            os.getxattr(app / "data.bin", "user.nothing")
        assert nodata.value.errno == errno.ENODATA
        with pytest.raises(OSError) as readonly:
            (app / "new").write_text("no")
        assert readonly.value.errno == errno.EROFS
        with pytest.raises(FileNotFoundError):
            os.lstat(app / "missing")
        with open(app / "data.bin", "rb") as handle:
            handle.seek(4090)
            assert handle.read(20) == (b"hello lazy world\n" * 1000)[4090:4110]


# -- prefetch --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prefetch_stays_within_its_bandwidth_and_never_delays_reads(lazy_python: LazyImage, tmp_path: Path) -> None:
    rate = 4 << 20
    config = write_config(
        tmp_path / "c.json",
        {
            "cache": {"work_dir": str(tmp_path / "cache")},
            "prefetch": {
                "enable": True,
                "prefetch_all": True,
                "threads_count": 4,
                "merging_size": 1 << 20,
                "bandwidth_rate": rate,
            },
        },
    )
    with mounted(lazy_python.reference, tmp_path / "mnt", config) as mnt:
        time.sleep(2.0)
        stats = mount_stats(mnt)
        progress = stats["prefetch"]
        assert progress["state"] == "running"
        assert 0 < progress["done_bytes"] <= rate * (progress["seconds"] + 1) + (1 << 20) * 4
        # A file at the end of the plan, not prefetched yet, reads at on-demand speed.
        started = time.monotonic()
        (mnt / "usr/lib/x86_64-linux-gnu/libcrypto.so.3").read_bytes()
        on_demand = time.monotonic() - started
        assert on_demand < 5.0, on_demand
        assert mount_stats(mnt)["reads"]["chunks_fetched"] > 0
