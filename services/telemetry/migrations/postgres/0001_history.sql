-- ORFEAS telemetry's history on PostgreSQL: the same tables as the SQLite store
-- (services/telemetry/store.py), so the service can move between machines and keep what it learned.
-- It holds every generation instance's profiles, samples and decisions, each with its worker_id.

CREATE TABLE profiles (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id text NOT NULL,
    backend text NOT NULL,
    worker_id text NOT NULL,
    device text NOT NULL,
    batch_size integer NOT NULL,
    image_width integer NOT NULL,
    image_height integer NOT NULL,
    resolution integer NOT NULL,
    steps integer NOT NULL,
    face_count integer NOT NULL,
    precision text NOT NULL,
    started_at double precision NOT NULL,
    total_duration_s double precision NOT NULL,
    ended_at double precision NOT NULL,
    succeeded integer NOT NULL,
    received_at double precision NOT NULL,
    UNIQUE (job_id, started_at)
);
CREATE INDEX profiles_backend_ended ON profiles (backend, ended_at);
CREATE INDEX profiles_ended ON profiles (ended_at);

CREATE TABLE stages (
    profile_id bigint NOT NULL REFERENCES profiles (id),
    name text NOT NULL,
    start_offset_s double precision NOT NULL,
    duration_s double precision NOT NULL,
    memory_peak_bytes bigint NOT NULL,
    PRIMARY KEY (profile_id, name)
);

CREATE TABLE substages (
    profile_id bigint NOT NULL REFERENCES profiles (id),
    stage text NOT NULL,
    name text NOT NULL,
    position integer NOT NULL,
    duration_s double precision NOT NULL,
    PRIMARY KEY (profile_id, stage, name)
);

CREATE TABLE device_samples (
    worker_id text NOT NULL,
    device text NOT NULL,
    device_type text NOT NULL,
    name text NOT NULL,
    memory_total_bytes bigint NOT NULL,
    memory_used_bytes bigint NOT NULL,
    memory_free_bytes bigint NOT NULL,
    utilization_percent double precision,
    temperature_c double precision,
    power_w double precision,
    torch_free_bytes bigint,
    torch_total_bytes bigint,
    torch_max_allocated_bytes bigint,
    sampled_at double precision NOT NULL,
    PRIMARY KEY (worker_id, device, sampled_at)
);
CREATE INDEX device_samples_time ON device_samples (sampled_at);

CREATE TABLE cost_observations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    backend text NOT NULL,
    resolution integer NOT NULL,
    steps integer NOT NULL,
    per_item_bytes bigint NOT NULL,
    image_pixels bigint NOT NULL,
    source text NOT NULL,
    observed_at double precision NOT NULL
);
CREATE INDEX cost_observations_key ON cost_observations (backend, resolution, steps, id);

CREATE TABLE oom_floors (
    backend text NOT NULL,
    resolution integer NOT NULL,
    steps integer NOT NULL,
    floor_bytes bigint NOT NULL,
    size integer NOT NULL,
    observed_at double precision NOT NULL,
    PRIMARY KEY (backend, resolution, steps)
);

CREATE TABLE decisions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    decided_at double precision NOT NULL,
    worker_id text NOT NULL,
    device text NOT NULL,
    backend text NOT NULL,
    resolution integer NOT NULL,
    steps integer NOT NULL,
    queue_length integer NOT NULL,
    image_width integer NOT NULL,
    image_height integer NOT NULL,
    available_bytes bigint NOT NULL,
    budget_bytes bigint NOT NULL,
    per_item_bytes bigint NOT NULL,
    basis text NOT NULL,
    memory_bound_size integer NOT NULL,
    size integer NOT NULL,
    reasoning text NOT NULL,
    ran_size integer,
    peak_memory_bytes bigint,
    out_of_memory integer
);
CREATE INDEX decisions_backend ON decisions (backend, id);
