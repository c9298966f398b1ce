-- The timeline of tasks per state reads tasks finished within a window.
CREATE INDEX tasks_finished_at ON tasks (finished_at) WHERE finished_at IS NOT NULL;
