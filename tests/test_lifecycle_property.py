"""The job life-cycle as a stateful property: random interleavings against a real generation service.

Rules: submit (quick and slow jobs), cancel, watch, kill -9 and restart, SIGTERM and restart, and
another process holding the database's write lock. After every run, for every accepted job:
- it is not lost, and it ended;
- exactly one terminal event, the last one, and the API's status, the row and that event agree;
- a job whose cancel was accepted while it was queued never ran after that;
- without a kill -9, nothing failed (SIGTERM alone never fails a job).
Bounded and seeded, so `make test` runs the same few interleavings every time. A restart or a lock
waits for a job to be accepted, and each run has at most MAX_RESTARTS and MAX_LOCKS: unbounded, the
seeded draw spent whole runs on nine restarts, or nine locks, of an empty service.
"""
from __future__ import annotations

import threading
import time

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.stack import Stack
from tests.conftest import new_stack
from tests.images import disk_png
from tests.lifecycle_helpers import TERMINAL, check_ended_consistently, stored_job, wait_until, write_lock_held

QUICK = dict(resolution=64, steps=5, face_count=1000, texture=False)
SLOW = dict(resolution=512, steps=50, face_count=20000, texture=False)
MAX_RESTARTS = 3
MAX_LOCKS = 3
MAX_EXAMPLES = 8


def may_restart(machine: JobLifecycle) -> bool:
    return bool(machine.accepted) and machine.restarts < MAX_RESTARTS


def may_lock(machine: JobLifecycle) -> bool:
    return bool(machine.accepted) and len(machine.lockers) < MAX_LOCKS


class JobLifecycle(RuleBasedStateMachine):
    """Class attribute `stack` (started) is set by the test below. Every run shares it: its jobs have all
    ended by the run's teardown, so the next run starts on an empty queue without paying for a new stack."""

    stack: Stack
    jobs = Bundle("jobs")

    @initialize()
    def start(self) -> None:
        if self.stack.processes["generation"].poll() is not None:
            self.stack.start("generation")  # a failed run left it down: the replay gets a live service
        self._connect()
        self.accepted: list[str] = []
        self.cancelled_before_start: set[str] = set()
        self.kills = 0
        self.restarts = 0
        self.lockers: list[threading.Thread] = []

    def _connect(self) -> None:
        self.channel = grpc.insecure_channel(self.stack.generation_address)
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)

    def _call(self, fn, *args, **kwargs):
        """A call that may meet the service restarting: UNAVAILABLE is retried, as clients do."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return fn(*args, timeout=60, **kwargs)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    @rule(target=jobs, slow=st.booleans(), seed=st.integers(0, 3))
    def submit(self, slow: bool, seed: int) -> str:
        params = SLOW if slow else QUICK
        job = self._call(self.stub.SubmitGeneration, pb.GenerateRequest(image=disk_png(256), seed=seed, **params))
        self.accepted.append(job.id)
        return job.id

    @rule(job_id=jobs)
    def cancel(self, job_id: str) -> None:
        answer = self._call(self.stub.CancelGeneration, pb.CancelGenerationRequest(id=job_id))
        if answer.status == pb.JOB_STATUS_CANCELLED and not answer.HasField("started_at"):
            self.cancelled_before_start.add(job_id)

    @rule(job_id=jobs)
    def watch(self, job_id: str) -> None:
        """Follow a job for a moment: whatever arrives is numbered without gaps, and nothing follows a terminal event."""
        received: list[pb.GenerationEvent] = []
        try:
            for event in self.stub.WatchGeneration(pb.WatchGenerationRequest(id=job_id), timeout=0.5):
                received.append(event)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise
        sequences = [e.sequence for e in received]
        assert sequences == list(range(1, len(received) + 1)), sequences
        terminal = [i for i, e in enumerate(received) if e.kind == pb.EVENT_KIND_TERMINAL]
        assert not terminal or terminal == [len(received) - 1]

    @precondition(may_restart)
    @rule()
    def kill_and_restart(self) -> None:
        self.channel.close()
        self.stack.kill("generation")
        self.kills += 1
        self.restarts += 1
        self.stack.start("generation")
        self._connect()

    @precondition(may_restart)
    @rule()
    def sigterm_and_restart(self) -> None:
        self.channel.close()
        assert self.stack.stop("generation") == 0
        self.restarts += 1
        self.stack.start("generation")
        self._connect()

    @precondition(may_lock)
    @rule(seconds=st.sampled_from([0.5, 1.5]))
    def another_process_holds_the_lock(self, seconds: float) -> None:
        started = threading.Event()

        def hold() -> None:
            with write_lock_held(self.stack.data_dir, seconds):
                started.set()

        thread = threading.Thread(target=hold)
        thread.start()
        started.wait(10)
        self.lockers.append(thread)

    def teardown(self) -> None:
        try:
            for thread in self.lockers:
                thread.join(30)
            self._check_every_job()
        finally:
            self.channel.close()

    def _check_every_job(self) -> None:
        for job_id in self.accepted:
            final = wait_until(
                lambda: (g := self._call(self.stub.GetGeneration, pb.GetGenerationRequest(id=job_id))).status
                in TERMINAL and g,
                180,
                0.1,
                f"{job_id} to end",
            )
            check_ended_consistently(self.stub, self.stack.data_dir, job_id)
            stored = stored_job(self.stack.data_dir, job_id)
            assert stored is not None
            if job_id in self.cancelled_before_start:
                assert final.status == pb.JOB_STATUS_CANCELLED
                assert stored.started_at is None
                # Cancelled while queued, though perhaps after an attempt that a kill -9 cut short and
                # recovery queued again: nothing ran after that last time in the queue.
                last_queued = max(e.sequence for e in stored.events if e.kind == pb.EVENT_KIND_QUEUED)
                assert not [e for e in stored.events if e.kind == pb.EVENT_KIND_STAGE
                            and e.sequence > last_queued], f"{job_id} ran after its cancel"
            if self.kills == 0:
                assert final.status != pb.JOB_STATUS_FAILED, f"{job_id} failed without a crash: {final.error}"
            elif final.status == pb.JOB_STATUS_FAILED:
                assert final.error.code == "interrupted", final.error


def test_the_job_lifecycle_holds_under_random_interleavings(tmp_path):
    JobLifecycle.stack = new_stack(
        tmp_path,
        "property",
        GENERATION_GRACE_PERIOD_S="0.5",
        GENERATION_MAX_ATTEMPTS="3",
        GENERATION_MAX_QUEUE_DELAY_MS="5",
    )
    JobLifecycle.stack.start_all()
    bounded = settings(
        max_examples=MAX_EXAMPLES,
        stateful_step_count=10,
        deadline=None,
        derandomize=True,  # the same interleavings every run
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    try:
        run_state_machine_as_test(JobLifecycle, settings=bounded)
    finally:
        JobLifecycle.stack.stop_all()
