"""Access to the admin API: a bearer token from config guards changes, and reads unless opened.

* No token configured: reads are open (a development cluster's view), changes answer 401 saying so.
* A token configured: changes need it; reads need it too unless ``api.open_reads`` is set.
* No ``Authorization`` header (or not a bearer one): 401 with ``WWW-Authenticate: Bearer``. A wrong
  token: 403. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from services.piece_scheduler.config import AdminApiConfig
from shared.errors import Forbidden, Unauthorized


def _api_config(request: Request) -> AdminApiConfig:
    config: AdminApiConfig = request.app.state.admin_api
    return config


def _check_token(request: Request, config: AdminApiConfig) -> None:
    if config.token is None:
        raise Unauthorized("this scheduler has no admin token configured (api.token); changes are disabled")
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(presented.strip().encode(), config.token.get_secret_value().encode()):
        raise Forbidden("the bearer token is not valid for this scheduler")


async def require_read(request: Request) -> None:
    """Dependency of read endpoints."""
    config = _api_config(request)
    if config.token is None or config.open_reads:
        return
    _check_token(request, config)


async def require_write(request: Request) -> None:
    """Dependency of mutating endpoints."""
    _check_token(request, _api_config(request))
