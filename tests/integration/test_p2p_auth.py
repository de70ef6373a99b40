"""Registry auth through a peer's mirror: basic auth (htpasswd) and the bearer token flow."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest

from shared.registry_client import BearerChallenge
from tests.support.cluster import local_cluster
from tests.support.images import MANIFEST_ACCEPT, OciImage, image_blobs, push_oci_layout
from tests.support.plugin import RegistryFactory
from tests.support.token_service import TokenService

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()


async def get(session: aiohttp.ClientSession, url: str, authorization: str | None = None) -> tuple[int, bytes, dict]:
    headers = {"Accept": MANIFEST_ACCEPT}
    if authorization:
        headers["Authorization"] = authorization
    async with session.get(url, headers=headers) as response:
        return response.status, await response.read(), dict(response.headers)


async def test_basic_auth_is_forwarded_for_manifests_and_used_by_the_seed_for_blobs(
    tmp_path: Path, registry_factory: RegistryFactory, small_image: OciImage
) -> None:
    origin = registry_factory(htpasswd=("alice", "s3cret"))
    push_oci_layout(small_image.layout, small_image.tag, origin.host, "test/small:v1", creds=("alice", "s3cret"))
    blobs = image_blobs(origin.url, "test/small", "v1", auth=("alice", "s3cret"))
    async with local_cluster(tmp_path / "cluster", origin.url, peers=1) as plan, aiohttp.ClientSession() as session:
        proxy = plan.peers[0].proxy
        status, _, headers = await get(session, f"{proxy}/v2/test/small/manifests/v1")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        status, _, _ = await get(session, f"{proxy}/v2/test/small/manifests/v1", BASIC)
        assert status == 200
        layer = blobs[-1]
        status, _, _ = await get(session, f"{proxy}/v2/test/small/blobs/{layer.digest}")
        assert status == 401  # No way around the origin's auth, even for a blob peers may hold.
        status, body, _ = await get(session, f"{proxy}/v2/test/small/blobs/{layer.digest}", BASIC)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest


async def test_the_bearer_token_flow_works_through_the_mirror(
    tmp_path: Path, registry_factory: RegistryFactory, token_service: TokenService, small_image: OciImage
) -> None:
    origin = registry_factory(extra_config=token_service.registry_config())
    push_oci_layout(small_image.layout, small_image.tag, origin.host, "test/small:v1", creds=("alice", "s3cret"))
    async with local_cluster(tmp_path / "cluster", origin.url, peers=1) as plan, aiohttp.ClientSession() as session:
        proxy = plan.peers[0].proxy
        status, _, headers = await get(session, f"{proxy}/v2/test/small/manifests/v1")
        assert status == 401
        challenge = BearerChallenge.parse(headers["WWW-Authenticate"])
        assert challenge is not None and challenge.realm == token_service.realm
        # The client does the token flow itself, against the realm, as docker and containerd do.
        params = {"service": challenge.service or "", "scope": challenge.scope or ""}
        async with session.get(challenge.realm, params=params, headers={"Authorization": BASIC}) as response:
            token = (await response.json())["token"]
        bearer = f"Bearer {token}"
        status, manifest, _ = await get(session, f"{proxy}/v2/test/small/manifests/v1", bearer)
        assert status == 200
        layer = json.loads(manifest)["layers"][0]
        status, body, _ = await get(session, f"{proxy}/v2/test/small/blobs/{layer['digest']}", bearer)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer["digest"]
