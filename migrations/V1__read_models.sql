-- Read models projected from the JetStream streams. Every value here comes
-- from an event; replaying the streams into an empty schema reproduces them.

CREATE TABLE tasks (
    id            uuid PRIMARY KEY,
    project       text        NOT NULL,
    name          text,
    state         text        NOT NULL,
    node_id       uuid,
    attempt       integer     NOT NULL,
    spec          jsonb       NOT NULL,
    exit_code     integer,
    reason        text,
    submitted_by  text        NOT NULL,
    submitted_at  timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    version       bigint      NOT NULL, -- events applied to this task
    last_seq      bigint      NOT NULL  -- stream sequence of its last event
);
CREATE INDEX tasks_project_id ON tasks (project, id);
CREATE INDEX tasks_state_id ON tasks (state, id);
CREATE INDEX tasks_node_id ON tasks (node_id, id) WHERE node_id IS NOT NULL;

CREATE TABLE nodes (
    id             uuid PRIMARY KEY,
    name           text        NOT NULL,
    labels         jsonb       NOT NULL,
    resources      jsonb       NOT NULL,
    status         text        NOT NULL, -- enrolled, online, offline or revoked
    enrolled_at    timestamptz,
    registered_at  timestamptz,
    last_seen      timestamptz,
    revoked_at     timestamptz,
    -- last heartbeat seen when the node was declared offline; a later heartbeat means online again
    offline_after  timestamptz,
    running_tasks  integer     NOT NULL,
    last_seq       bigint      NOT NULL
);

CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    name        text        NOT NULL,
    digest      text        NOT NULL UNIQUE, -- hex SHA-256; the secret is never stored
    projects    text[]      NOT NULL,
    admin       boolean     NOT NULL,
    issued_at   timestamptz NOT NULL,
    revoked_at  timestamptz
);

-- Last stream sequence applied, written in the same transaction as the rows.
CREATE TABLE projection_checkpoints (
    stream      text PRIMARY KEY,
    seq         bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Messages a projector could not apply; projection goes on past them.
CREATE TABLE projection_errors (
    stream       text        NOT NULL,
    seq          bigint      NOT NULL,
    subject      text        NOT NULL,
    error        text        NOT NULL,
    payload      bytea       NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, seq)
);
