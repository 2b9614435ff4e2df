"""The PostgreSQL job store (services/generation/pg_store.py) against a real server, several "instances"
(stores with their own pools) at once: migrations under an advisory lock, claims that never overlap,
leases that run out into a reclaim, notices of every committed change, admission counted cluster-wide.
"""
from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from pb.orfeas.generation.v1 import generation_pb2 as pb
from services.common.postgres import SchemaTooNew, migrate
from services.generation import jobs, lifecycle
from services.generation.cluster_jobs import batch_key_text
from services.generation.pg_store import MIGRATIONS, Notice, PgJobStore, QueueFull, _progress_only
from services.generation.pipeline.params import GenerationParams
from services.generation.store import Change, JobRecord
from tests.postgres_fixtures import PostgresServer

PARAMS = GenerationParams()


def new_store(url: str, origin: str, lease_s: float = 30.0) -> PgJobStore:
    return PgJobStore(url, origin=origin, batch_key_of=batch_key_text, lease_s=lease_s, pool_size=4)


async def admit(store: PgJobStore, request_id: str = "", limit: int | None = None, payload: str = "p") -> JobRecord:
    record = jobs._new_record(PARAMS, payload, 0.01, request_id, None, False)
    stored, _, _ = await store.admit(record, lambda position: jobs._submit_events(record, 0.01, position), limit)
    return stored


def claim_change(token: str, worker: str):
    return lambda r: jobs._claim_change(r.id, False, token, f"{worker}/cpu", "cpu")


def requeue_change(record: JobRecord) -> Change:
    token = record.claim_token
    return Change(
        record.id,
        expect=lambda r: r.status == lifecycle.RUNNING and r.claim_token == token,
        change=jobs._checked(lambda r: lifecycle.requeue(r, count_attempt=True, progress=0.0)),
        event=lambda r: jobs._event(r, kind=pb.EVENT_KIND_QUEUED),
    )


async def test_two_instances_migrating_at_once_apply_each_migration_once(postgres: PostgresServer) -> None:
    url = postgres.database()
    a, b = new_store(url, "a:1"), new_store(url, "b:1")
    await asyncio.gather(a.open(), b.open())
    try:
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT scope, version, name FROM schema_migrations").fetchall()
        assert rows == [("generation", 1, "0001_jobs.sql"), ("generation", 2, "0002_queue_counter.sql")]
        # A database migrated by newer code is refused, not written to.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_migrations (scope, version, name) VALUES ('generation', 99, 'x.sql')")
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            with pytest.raises(SchemaTooNew, match="schema version 99, newer than this code.s 2"):
                await migrate(conn, MIGRATIONS, "generation")
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_claims_from_two_instances_never_overlap_and_an_expired_lease_is_reclaimed(
    postgres: PostgresServer,
) -> None:
    url = postgres.database()
    a, b = new_store(url, "a:1", lease_s=1.0), new_store(url, "b:1", lease_s=1.0)
    await asyncio.gather(a.open(), b.open())
    try:
        admitted = [await admit(a) for _ in range(12)]
        key = batch_key_text(PARAMS.to_dict())
        # Both claim at once, again and again, until the queue is empty: SKIP LOCKED, nobody waits or doubles.
        taken: dict[str, list[str]] = {"a": [], "b": []}

        async def claimer(store: PgJobStore, name: str) -> None:
            while True:
                applied, _ = await store.claim(key, 3, claim_change(f"tok-{name}", f"{name}:1"))
                if not applied:
                    return
                taken[name] += [x.after.id for x in applied]

        await asyncio.gather(claimer(a, "a"), claimer(b, "b"))
        assert sorted(taken["a"] + taken["b"]) == sorted(r.id for r in admitted)
        assert not set(taken["a"]) & set(taken["b"])

        # a keeps renewing its leases; b's instance "died": only b's jobs come back, the attempt counted.
        assert await a.reclaim(requeue_change) == []  # nothing has expired yet
        await asyncio.sleep(0.6)
        assert await a.renew(["tok-a"]) == len(taken["a"])
        await asyncio.sleep(0.6)
        await a.renew(["tok-a"])
        reclaimed = await a.reclaim(requeue_change)
        assert sorted(x.after.id for x in reclaimed) == sorted(taken["b"])
        assert all(x.after.status == "queued" and x.after.attempts == 1 and x.after.worker_id is None for x in reclaimed)
        for job_id in taken["a"]:
            assert (await a.get(job_id)).status == "running"  # type: ignore[union-attr]
        # Events are numbered on from the last one, with the requeue's queued event at the end.
        events = [pb.GenerationEvent.FromString(e) for e in await b.events(taken["b"][0])]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].kind == pb.EVENT_KIND_QUEUED
        # An earlier life of instance a: its running jobs come back at once, expired or not.
        await a.renew(["tok-a"])
        mine = await b.reclaim(requeue_change, owner="a:1")
        assert sorted(x.after.id for x in mine) == sorted(taken["a"])
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_every_committed_change_is_announced_to_every_instance(postgres: PostgresServer) -> None:
    url = postgres.database()
    a, b = new_store(url, "a:1"), new_store(url, "b:1")
    await asyncio.gather(a.open(), b.open())
    heard: list[Notice] = []
    queued: list[float] = []
    connected = asyncio.Event()
    listening = asyncio.create_task(b.listen(heard.append, lambda: queued.append(time.monotonic()), connected.set))
    try:
        await asyncio.wait_for(connected.wait(), 10)
        record = await admit(a)
        (_claimed,), left = await a.claim(batch_key_text(PARAMS.to_dict()), 1, claim_change("t", "a:1"))
        assert left == 0
        # A flag with no event (a cancel of a running job) is news too; a lease renewal is not.
        await a.renew(["t"])
        cancel = Change(record.id, lambda r: True, jobs._checked(lifecycle.request_cancel), None)
        (cancelled,) = await a.apply([cancel])
        assert cancelled is not None and cancelled.after.cancel_requested
        deadline = time.monotonic() + 5
        while len(heard) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert [(n.job_id, n.version, n.origin) for n in heard] == [
            (record.id, 1, "a:1"),
            (record.id, 2, "a:1"),
            (record.id, 3, "a:1"),
        ]
        assert [n.last_seq for n in heard] == [3, 4, 4]
        assert len(queued) == 1  # the admission; a claim queues nothing
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await asyncio.gather(a.close(), b.close())


async def test_admission_limit_and_request_ids_hold_across_instances(postgres: PostgresServer) -> None:
    url = postgres.database()
    a, b = new_store(url, "a:1"), new_store(url, "b:1")
    await asyncio.gather(a.open(), b.open())
    try:
        # Eight admissions race from two instances against a limit of five: exactly five get in.
        async def try_admit(store: PgJobStore, n: int) -> bool:
            try:
                await admit(store, limit=5, payload=str(n))
                return True
            except QueueFull as full:
                assert full.waiting == 5
                return False

        results = await asyncio.gather(*(try_admit(a if n % 2 else b, n) for n in range(8)))
        assert sum(results) == 5 and await a.queue_length() == 5
        # One request id, two instances: one job; the second admission is told of the first.
        first = await admit(a, request_id="order-7", limit=None)
        record = jobs._new_record(PARAMS, "p", 0.01, "order-7", None, False)
        again, created, _ = await b.admit(record, lambda p: jobs._submit_events(record, 0.01, p), None)
        assert not created and again.id == first.id
        assert await b.position(first) == 6
    finally:
        await asyncio.gather(a.close(), b.close())


def test_only_a_running_jobs_progress_commits_without_waiting_for_its_flush() -> None:
    queued = jobs._new_record(PARAMS, "p", 0.01, "", None, False)
    running = lifecycle.claim(queued, "tok", "image_preprocessing", 0.1, worker_id="a:1/cpu", device="cpu")
    moved = lifecycle.stage(running, "shape_generation", 0.4, None)
    assert _progress_only(running, moved)
    assert _progress_only(moved, lifecycle.stage(moved, "shape_generation", 0.5, 0.2))
    # Every change of state waits for its flush: the claim, a cancel, the end, a requeue, a queued note.
    assert not _progress_only(queued, running)
    assert not _progress_only(moved, lifecycle.request_cancel(moved))
    assert not _progress_only(moved, lifecycle.finish(moved, lifecycle.SUCCEEDED, result={"faces": 1}))
    assert not _progress_only(moved, lifecycle.finish(moved, lifecycle.FAILED, error=("stalled", "x")))
    assert not _progress_only(moved, lifecycle.requeue(moved, count_attempt=True, progress=0.0))
    assert not _progress_only(queued, lifecycle.note(queued))


async def test_a_progress_write_leaves_the_session_committing_durably(postgres: PostgresServer) -> None:
    store = new_store(postgres.database(), "a:1")
    await store.open()
    try:
        record = await admit(store)
        (_claimed,), _ = await store.claim(batch_key_text(PARAMS.to_dict()), 1, claim_change("tok", "a:1"))
        stage = Change(
            record.id,
            expect=lambda r: r.status == lifecycle.RUNNING and r.claim_token == "tok",
            change=jobs._checked(lambda r: lifecycle.stage(r, "shape_generation", 0.4, None)),
            event=lambda r: jobs._event(r, kind=pb.EVENT_KIND_STAGE),
        )
        (applied,) = await store.apply([stage])
        assert applied is not None and applied.after.stage == "shape_generation"
        # The progress row is committed like any other: every instance reads it, event and all.
        assert await new_store_get(postgres, store, record.id) == applied.after
        events = [pb.GenerationEvent.FromString(e) for e in await store.events(record.id)]
        assert events[-1].kind == pb.EVENT_KIND_STAGE and events[-1].sequence == applied.event.sequence
        # The relaxed commit was that transaction's alone: the connection's next commit waits for its flush.
        assert store._writer is not None
        setting = await (await store._writer.execute("SHOW synchronous_commit")).fetchone()
        assert setting["synchronous_commit"] == "on"
    finally:
        await store.close()


async def new_store_get(postgres: PostgresServer, store: PgJobStore, job_id: str) -> JobRecord:
    """The job as another instance reads it, straight from the database."""
    other = PgJobStore(store.url, origin="b:1", batch_key_of=batch_key_text, pool_size=1)
    await other.open()
    try:
        found = await other.get(job_id)
        assert found is not None
        return found
    finally:
        await other.close()
