"""Open an image store for a reference: the composition of references, credentials and clients."""

from __future__ import annotations

import aiohttp

from .auth import resolve_credentials
from .layout import LayoutStore
from .reference import LayoutRef, RegistryRef
from .registry import RegistryClient, RegistryStore
from .store import ImageStore


def open_store(
    ref: RegistryRef | LayoutRef,
    session: aiohttp.ClientSession,
    *,
    insecure: bool = False,
    creds: str | None = None,
) -> ImageStore:
    """A store for ``ref``: a layout directory, or a registry repository with credentials resolved."""
    if isinstance(ref, LayoutRef):
        return LayoutStore(ref)
    client = RegistryClient(
        session, ref.api_host, insecure=insecure, credentials=resolve_credentials(ref.api_host, creds)
    )
    return RegistryStore(client, ref)
