"""``GET /v1/me``: who the calling key is — its workspace and the scopes it holds.

Any valid key may ask (no scope is needed to learn one's own scopes); the web console
uses it to show only the sections a key can use.
"""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa
from pydantic import Field

from service.apimodels import Data, Out, UuidText
from service.db import workspaces
from service.http import DB_KEY, principal
from service.keys import SCOPES
from service.routing import Answer, Call, Operation

Scope = Literal["contacts:read", "contacts:write", "webhooks:manage", "audit:read"]


class Me(Out):
    workspace_id: UuidText
    workspace_name: str
    key_id: UuidText
    scopes: list[Scope] = Field(description="The key's scopes, in this order of the four")


async def me(call: Call) -> Data[Me]:
    """The caller's workspace and scopes; 401 ``invalid_key`` comes from the edge."""
    who = principal(call.request)
    async with call.app[DB_KEY].read() as conn:
        name = (
            await conn.execute(
                sa.select(workspaces.c.name).where(workspaces.c.id == who.workspace_id)
            )
        ).scalar_one()
    scopes: list[Scope] = [s for s in SCOPES if who.allows(s)]  # type: ignore[misc]
    return Data[Me](
        data=Me(
            workspace_id=str(who.workspace_id),
            workspace_name=name,
            key_id=str(who.key_id),
            scopes=scopes,
        )
    )


ROUTES: tuple[Operation, ...] = (
    Operation(
        "GET",
        "/v1/me",
        me,
        "getMe",
        "The calling key: its workspace and the scopes it holds",
        tag="Operations",
        scope=None,
        answers=(Answer(200, Data[Me], "The key"),),
        errors=(401, 429),
        description="Needs a key but no scope: any valid key may learn its own scopes "
        "(the console uses it to show only what the key can use).",
    ),
)
