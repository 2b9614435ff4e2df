-- ORFEAS generation: jobs, their events and the tombstones of expired ones, shared by every instance.
-- The columns match the SQLite store's (services/generation/job_store.py); what only a cluster needs
-- (the queue's batch key, the claim's lease, the queued position last reported, the last event
-- number) sits beside them.

CREATE TABLE jobs (
    id text PRIMARY KEY,
    request_id text UNIQUE,
    payload_sha256 text NOT NULL,
    status text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    params text NOT NULL,
    -- Jobs with the same key can share one batched shape_generation call (GenerationParams.batch_key).
    batch_key text NOT NULL,
    stage text NOT NULL DEFAULT '',
    progress double precision NOT NULL DEFAULT 0,
    stage_timings text NOT NULL DEFAULT '{}',
    result text,
    error_code text,
    error_message text,
    attempts integer NOT NULL DEFAULT 0,
    deadline double precision,
    cancel_on_disconnect boolean NOT NULL DEFAULT false,
    created_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    cancel_requested boolean NOT NULL DEFAULT false,
    claim_token text,
    version integer NOT NULL DEFAULT 0,
    worker_id text,
    device text,
    -- A running job's claim holds until then (database time), renewed by its instance's heartbeat;
    -- past it any instance puts the job back in the queue.
    leased_until timestamptz,
    reported_position integer NOT NULL DEFAULT 0,
    last_seq integer NOT NULL DEFAULT 0
);

CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status ON jobs (status);
-- The queue, in order; and per batch key, for claims.
CREATE INDEX jobs_queue ON jobs (created_at, id) WHERE status = 'queued';
CREATE INDEX jobs_queue_batch ON jobs (batch_key, created_at, id) WHERE status = 'queued';
CREATE INDEX jobs_queue_deadline ON jobs (deadline) WHERE status = 'queued' AND deadline IS NOT NULL;
CREATE INDEX jobs_leases ON jobs (leased_until) WHERE status = 'running';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE events (
    job_id text NOT NULL,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE expired (
    id text PRIMARY KEY,
    reason text NOT NULL,
    expired_at double precision NOT NULL
);

-- Every committed change of a job is announced to every instance (LISTEN orfeas_jobs): its id, its
-- version, its last event's number and the instance that made it. A job that becomes queued is also
-- announced on orfeas_queue, which wakes idle workers everywhere. Notifications are sent at commit,
-- so nobody hears of a change that rolled back.
CREATE FUNCTION orfeas_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'orfeas_jobs',
        NEW.id || ' ' || NEW.version || ' ' || NEW.last_seq || ' ' || coalesce(current_setting('orfeas.origin', true), '')
    );
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status <> 'queued') THEN
        PERFORM pg_notify('orfeas_queue', NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_inserted AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION orfeas_job_changed();
-- A lease renewal changes no version: it is nobody's news.
CREATE TRIGGER jobs_changed AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (OLD.version IS DISTINCT FROM NEW.version) EXECUTE FUNCTION orfeas_job_changed();
