"""pytest fixtures over real servers: docker-registry origins, pushed images, PostgreSQL.

Load with `pytest_plugins = ["tests.support.plugin"]` in the top-level conftest.
Temp dirs are removed at teardown whether the test passed or not; set DAMSELFLY_KEEP_TEST_TMP=1 to
keep them for a post-mortem. A failing test gets the registry's log tails in its report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.support.images import (
    Manifest,
    OciImage,
    build_small_image,
    get_manifest,
    push_oci_layout,
    python_image,
)
from tests.support.postgres import PostgresServer
from tests.support.registry import RegistryServer
from tests.support.token_service import TokenService

# What `small_image` contains, so tests can assert on it without rebuilding the dict.
SMALL_IMAGE_FILES: Mapping[str, bytes] = {
    "app/hello.txt": b"hello from damselfly\n",
    "app/run": b"#!/bin/sh\ncat /app/hello.txt\n",
    "app/data/blob.bin": bytes(range(256)) * 64,  # 16 KiB, so the layer is more than a header
}
SMALL_IMAGE_CMD: tuple[str, ...] = ("/app/run", "--greeting")
SMALL_IMAGE_TAG = "v1"

_report_key = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item so fixtures can tell, at teardown, whether the test failed."""
    report = yield
    item.stash.setdefault(_report_key, {})[report.when] = report
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_report_key, {})
    return any(r.failed for r in reports.values())


@contextlib.contextmanager
def _tempdir(prefix: str) -> Iterator[Path]:
    """A private temp dir removed on exit, even on failure (unless DAMSELFLY_KEEP_TEST_TMP is set)."""
    path = Path(tempfile.mkdtemp(prefix=f"damselfly-{prefix}-"))
    try:
        yield path
    finally:
        if os.environ.get("DAMSELFLY_KEEP_TEST_TMP"):
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def _dump_registry(reg: RegistryServer) -> None:
    # Printed during teardown: pytest shows it under "Captured stdout teardown" of the failed test.
    access = reg.access_log_path.read_text(errors="replace").splitlines()[-30:]
    print(f"--- registry {reg.host} access log (last 30) ---", *access, sep="\n")
    print(f"--- registry {reg.host} log (last 30) ---", reg.log_tail(30), sep="\n")


class RegistryFactory(Protocol):
    """Signature of the `registry_factory` fixture."""

    def __call__(
        self,
        *,
        htpasswd: tuple[str, str] | None = None,
        proxy_remote_url: str | None = None,
        proxy_credentials: tuple[str, str] | None = None,
        extra_config: Mapping[str, object] | None = None,
    ) -> RegistryServer: ...


@pytest.fixture
def registry_factory(request: pytest.FixtureRequest) -> Iterator[RegistryFactory]:
    """Start any number of registries in one test; all stopped and deleted at teardown."""
    started: list[RegistryServer] = []
    with contextlib.ExitStack() as stack:

        def make(
            *,
            htpasswd: tuple[str, str] | None = None,
            proxy_remote_url: str | None = None,
            proxy_credentials: tuple[str, str] | None = None,
            extra_config: Mapping[str, object] | None = None,
        ) -> RegistryServer:
            workdir = stack.enter_context(_tempdir("registry"))
            server = RegistryServer(
                workdir,
                htpasswd=htpasswd,
                proxy_remote_url=proxy_remote_url,
                proxy_credentials=proxy_credentials,
                extra_config=extra_config,
            )
            # Registered before start() so a half-started process is still stopped.
            stack.callback(server.stop)
            started.append(server)
            return server.start()

        yield make
        if _failed(request):
            for server in started:
                _dump_registry(server)


@pytest.fixture
def registry(registry_factory: RegistryFactory) -> RegistryServer:
    """A fresh, empty, unauthenticated origin registry for this test."""
    return registry_factory()


@dataclass(frozen=True)
class PushedImage:
    """An image pushed to a running registry."""

    registry: RegistryServer
    repo: str
    tag: str
    manifest: Manifest

    @property
    def reference(self) -> str:
        """HOST:PORT/REPO:TAG, as a client would pull it."""
        return f"{self.registry.host}/{self.repo}:{self.tag}"

    @property
    def digest(self) -> str:
        """Manifest digest."""
        return self.manifest.digest

    @property
    def image_bytes(self) -> int:
        """Sum of the sizes of config and layers: what one full pull fetches from blob endpoints."""
        return sum(d.size for d in self.manifest.blobs)


def _push(reg: RegistryServer, image: OciImage, repo: str, tag: str) -> PushedImage:
    push_oci_layout(image.layout, image.tag, reg.host, f"{repo}:{tag}", creds=reg.credentials)
    return PushedImage(reg, repo, tag, get_manifest(reg.url, repo, tag, auth=reg.credentials))


@pytest.fixture(scope="session")
def python_image_layout() -> OciImage:
    """The shared python-3.11 OCI layout (read-only!); fails, never skips, if it is missing."""
    try:
        return python_image()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def python_image_in_registry(python_image_layout: OciImage) -> Iterator[PushedImage]:
    """A session-wide registry holding the shared python image as library/python:3.11.

    Shared by many tests: take `registry.mark()` first and pass `since=` to count only your requests.
    """
    with _tempdir("registry-python") as workdir, RegistryServer(workdir) as reg:
        yield _push(reg, python_image_layout, "library/python", "3.11")


@pytest.fixture
def small_image() -> Iterator[OciImage]:
    """A tiny OCI layout of SMALL_IMAGE_FILES with cmd SMALL_IMAGE_CMD, tag SMALL_IMAGE_TAG."""
    with _tempdir("small-image") as workdir:
        yield build_small_image(
            workdir,
            SMALL_IMAGE_FILES,
            tag=SMALL_IMAGE_TAG,
            cmd=SMALL_IMAGE_CMD,
            env={"DAMSELFLY_TEST": "1"},
            modes={"app/run": 0o755},
        )


@pytest.fixture
def small_image_in_registry(registry: RegistryServer, small_image: OciImage) -> PushedImage:
    """`small_image` pushed to this test's `registry` as test/small:v1."""
    return _push(registry, small_image, "test/small", SMALL_IMAGE_TAG)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster for the whole session (trust auth, user postgres)."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL postgresql+psycopg://postgres@127.0.0.1:PORT/postgres of the session cluster."""
    return postgres_server.url


@pytest.fixture
def postgres_database_url(postgres_server: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL of a fresh empty database for this test, dropped afterwards."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture
def token_service(tmp_path: Path) -> Iterator[TokenService]:
    """A Docker token service for user alice (password s3cret)."""
    service = TokenService(tmp_path, {"alice": "s3cret"})
    yield service
    service.close()
