"""The sender's queue read and claim take what they should and read only that (issue 8).

The queue read (`_due_ids`) gives the oldest due, unclaimed deliveries of endpoints nobody
else owns, pending and failing ones merged by due time, without those of the endpoints
whose queues are full; it reads each status in index order (on PostgreSQL a merge of two
index scans, no sort of the backlog). The claim (`_claim_statement`) goes by id: on SQLite
its plan searches the primary key, not the (status, next_attempt_at) index that made each
claim read the whole backlog.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from service.db import Database, new_id, utcnow, webhook_deliveries, webhook_endpoints
from service.keys import ensure_workspace
from service.webhooks.dispatcher import _claim_statement, _due_ids
from service.webhooks.store import NewDeliveries, enqueue_many

D = webhook_deliveries.c
E = webhook_endpoints.c


async def _endpoint(db: Database, workspace_id: uuid.UUID, owner: str | None = None) -> uuid.UUID:
    endpoint_id, now = new_id(), utcnow()
    async with db.begin() as conn:
        await conn.execute(
            webhook_endpoints.insert().values(
                id=endpoint_id,
                workspace_id=workspace_id,
                url="http://127.0.0.1:9/hook",
                description=None,
                event_types=[],
                rate_limit_per_s=None,
                max_in_flight=None,
                secret="whsec_AAAA",
                retired_secrets=[],
                status="enabled",
                disabled_reason=None,
                disabled_at=None,
                created_at=now,
                updated_at=now,
                owner=owner,
                owner_until=None if owner is None else now + timedelta(minutes=5),
            )
        )
    return endpoint_id


async def test_the_queue_read_merges_the_due_work_oldest_first(db: Database) -> None:
    """Pending and failing deliveries interleaved by due time; not the claimed, not yet
    due, finished ones, nor another dispatcher's or a full queue's endpoint."""
    ws = await ensure_workspace(db, "sender-statements")
    mine, others, full = (
        await _endpoint(db, ws),
        await _endpoint(db, ws, owner="another-dispatcher"),
        await _endpoint(db, ws),
    )
    now = utcnow()
    async with db.begin() as conn:
        created = await enqueue_many(
            conn,
            db,
            [
                NewDeliveries(ws, [mine, others, full], f"evt_{n}", "contact.deleted", b"{}")
                for n in range(8)
            ],
        )
        ids = {(r["endpoint_id"], r["event_id"]): r["id"] for r in created}
        # Event n is due n minutes ago (the oldest is evt_7); odd ones failing.
        states = {
            n: {
                "status": "failing" if n % 2 else "pending",
                "next_attempt_at": now - timedelta(minutes=n),
            }
            for n in range(8)
        }
        states[2] |= {"claimed_until": now + timedelta(minutes=1)}  # in flight
        states[3] |= {"claimed_until": now - timedelta(minutes=1)}  # its lease lapsed
        states[4] |= {"next_attempt_at": now + timedelta(minutes=1)}  # not due yet
        states[5] |= {"status": "succeeded"}
        for n, values in states.items():
            await conn.execute(
                webhook_deliveries.update().where(D.event_id == f"evt_{n}").values(**values)
            )
    async with db.read() as conn:
        rows = (await conn.execute(_due_ids(now, "this-dispatcher", {full}))).all()
    expected = [ids[(mine, f"evt_{n}")] for n in (7, 6, 3, 1, 0)]
    assert [row[0] for row in rows] == expected
    assert {uuid.UUID(str(row[1])) for row in rows} == {mine}


async def test_the_queue_read_and_the_claim_read_no_backlog_they_do_not_take(
    db: Database,
) -> None:
    now = utcnow()
    claim = _claim_statement([uuid.uuid4()], now, now + timedelta(minutes=1))
    refill = _due_ids(now, "this-dispatcher", set())
    async with db.begin() as conn:
        if db.is_sqlite:
            compiled = claim.compile(
                dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
            )
            sql = str(compiled)
            rows = (
                await conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + sql, tuple("[]" for _ in range(sql.count("?")))
                )
            ).all()
            plan = " ".join(str(r[-1]) for r in rows)
            assert "sqlite_autoindex_webhook_deliveries_1" in plan, plan
            assert "ix_webhook_deliveries_due" not in plan, plan
            return
        # PostgreSQL (sequential scans off: the test's tables are small): each status read
        # in index order, merged, and no sort of what they read.
        await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        compiled = refill.compile(dialect=conn.dialect)
        await conn.exec_driver_sql(f"PREPARE due_plan AS {compiled}")
        values = [compiled.params[name] for name in compiled.positiontup or ()]
        args = ", ".join(
            str(v) if isinstance(v, int) else f"'{v.isoformat() if isinstance(v, datetime) else v}'"
            for v in values
        )
        result = await conn.exec_driver_sql(f"EXPLAIN EXECUTE due_plan({args})")
        nodes = [str(r[0]).strip().removeprefix("->").strip() for r in result.all()]
    plan = "\n".join(nodes)
    assert nodes[1].startswith("Merge Append"), plan
    assert not any(node.startswith(("Sort  (", "Incremental Sort")) for node in nodes), plan
