"""``GET /v1/me``: who the calling key is — its workspace and the scopes it holds.

Any valid key may ask (no scope is needed to learn one's own scopes); the web console
uses it to show only the sections a key can use. Nothing of the key itself is returned
beyond its id and its prefix-free scopes.
"""

from __future__ import annotations

import sqlalchemy as sa
from aiohttp import web

from service.db import workspaces
from service.http import DB_KEY, json_response, principal
from service.keys import SCOPES


async def me(request: web.Request) -> web.Response:
    """200 ``{"data": {"workspace_id", "workspace_name", "key_id", "scopes"}}``.

    ``scopes`` lists the key's scopes in the canonical order of ``service.keys.SCOPES``.
    401 ``invalid_key`` for a missing, unknown or revoked key (the edge middleware).
    """
    who = principal(request)
    async with request.app[DB_KEY].read() as conn:
        name = (
            await conn.execute(
                sa.select(workspaces.c.name).where(workspaces.c.id == who.workspace_id)
            )
        ).scalar_one()
    return json_response(
        {
            "data": {
                "workspace_id": str(who.workspace_id),
                "workspace_name": name,
                "key_id": str(who.key_id),
                "scopes": [s for s in SCOPES if who.allows(s)],
            }
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/me", me)
