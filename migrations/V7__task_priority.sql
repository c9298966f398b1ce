-- The task's current priority (from task.submitted and task.reprioritized).
ALTER TABLE tasks ADD COLUMN priority int4 NOT NULL DEFAULT 0;
