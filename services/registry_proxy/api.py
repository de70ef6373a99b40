"""The registry-proxy's routes: the OCI Distribution API base."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

router = APIRouter(tags=["registry"])

# Clients (docker, containerd, skopeo) check this header to know they speak to a v2 registry.
DISTRIBUTION_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}


@router.get("/v2/", summary="OCI Distribution API version check.")
async def api_version() -> JSONResponse:
    return JSONResponse({}, headers=DISTRIBUTION_HEADERS)
