-- The number of queued jobs, kept by a trigger as jobs enter and leave the queue, so that admission
-- (the cluster-wide queue limit) and the queue-length gauge read one row instead of counting a long
-- queue. Every change that moves a job into or out of `queued` updates it in its own transaction.

CREATE TABLE queue_counter (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    queued bigint NOT NULL
);
INSERT INTO queue_counter (queued) SELECT count(*) FROM jobs WHERE status = 'queued';

CREATE FUNCTION orfeas_count_queue() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta integer := 0;
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status = 'queued' THEN
        delta := delta + 1;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'queued' THEN
        delta := delta - 1;
    END IF;
    IF delta <> 0 THEN
        UPDATE queue_counter SET queued = queued + delta;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_queued_insert AFTER INSERT OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION orfeas_count_queue();
-- Most updates (a running job's stage events) leave the status alone: no function call for them.
CREATE TRIGGER jobs_count_queued_update AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION orfeas_count_queue();
