"""The agent's routes: mounts as a resource (``/api/v1/mounts``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.chunk_fuse.mounts import MountManager

router = APIRouter(prefix="/api/v1", tags=["mounts"])


class MountRequest(BaseModel):
    """``POST /api/v1/mounts``: what to mount where, and how."""

    image: str = Field(description="A converted image: HOST[:PORT]/REPO[:TAG|@DIGEST].")
    mountpoint: Path = Field(description="An existing directory (absolute path).")
    config: dict[str, Any] | None = Field(
        None, description="Mount config: Damselfly's shape or a nydusd config.json; the node's defaults fill gaps."
    )
    platform: str = Field("linux/amd64", description="OS/ARCH[/VARIANT] to pick from an index.")
    mirror: str | None = Field(None, description="Like `damselfly mount --mirror`: this mirror, over the config's.")
    insecure: bool = Field(False, description="Like `--insecure`: the registry speaks plain HTTP or unverified TLS.")


def manager(request: Request) -> MountManager:
    """The app's mount manager."""
    mounts: MountManager = request.app.state.mounts
    return mounts


@router.post("/mounts", status_code=201, summary="Mount an image lazily; answers once the mount is ready.")
async def create_mount(body: MountRequest, request: Request) -> JSONResponse:
    mount = await manager(request).create(
        body.image, body.mountpoint, body.config, body.platform, mirror=body.mirror, insecure=body.insecure
    )
    return JSONResponse(mount.describe(), status_code=201)


@router.get("/mounts", summary="This agent's mounts, with their stats as of the last poll.")
async def list_mounts(request: Request) -> dict[str, Any]:
    mounts = manager(request)
    return {
        "mounts": [m.describe() for m in mounts.mounts.values()],
        "kept": mounts.kept_state(),
        "standby": mounts.standby_state(),
    }


@router.post(
    "/caches/drop",
    summary="Every mount daemon forgets the chunks it holds in memory (the disk chunk cache stays).",
)
async def drop_memory(request: Request) -> dict[str, Any]:
    return {"dropped_chunks": await manager(request).drop_memory()}


@router.get("/mounts/{mount_id}", summary="One mount, with fresh stats.")
async def get_mount(mount_id: str, request: Request) -> dict[str, Any]:
    mounts = manager(request)
    mount = mounts.get(mount_id)
    await mounts.refresh(mount)
    return mount.describe()


@router.delete("/mounts/{mount_id}", summary="Unmount and end the mount's daemon.")
async def delete_mount(mount_id: str, request: Request, lazy: bool = False) -> dict[str, Any]:
    mount = await manager(request).delete(mount_id, lazy=lazy)
    return {"id": mount.id, "mountpoint": str(mount.mountpoint), "unmounted": True}
