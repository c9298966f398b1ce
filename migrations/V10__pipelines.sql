-- Pipelines (stream UD_PIPELINES): the steps as submitted (definition) and
-- each step as it runs (steps: name, listed step, matrix values, needs,
-- when, state, task_id, runs, reason).
CREATE TABLE pipelines (
    id            uuid PRIMARY KEY,
    project       text        NOT NULL,
    name          text,
    status        text        NOT NULL, -- running, succeeded, failed or cancelled
    cancelling    boolean     NOT NULL,
    definition    jsonb       NOT NULL,
    steps         jsonb       NOT NULL,
    submitted_by  text        NOT NULL,
    submitted_at  timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    version       bigint      NOT NULL,
    last_seq      bigint      NOT NULL
);
CREATE INDEX pipelines_project_id ON pipelines (project, id);
CREATE INDEX pipelines_status_id ON pipelines (status, id);
