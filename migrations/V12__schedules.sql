-- Schedules (stream UD_SCHEDULES): what each submits (body: {"task": ...}
-- or {"pipeline": ...}, the REST body), when, and how far it has come.
CREATE TABLE schedules (
    id             uuid PRIMARY KEY,
    project        text        NOT NULL,
    name           text        NOT NULL,
    cron           text        NOT NULL,
    timezone       text        NOT NULL,
    missed         text        NOT NULL, -- skip or catch_up
    body           jsonb       NOT NULL,
    state          text        NOT NULL, -- active, paused or deleted
    paused_reason  text,
    done_until     timestamptz NOT NULL, -- the latest time fired, skipped or passed while paused
    fired          bigint      NOT NULL,
    skipped        bigint      NOT NULL,
    last_due       timestamptz,
    last_task_id   uuid,
    last_pipeline_id uuid,
    last_error     text,
    created_by     text        NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    version        bigint      NOT NULL,
    last_seq       bigint      NOT NULL
);
CREATE INDEX schedules_project_id ON schedules (project, id);
