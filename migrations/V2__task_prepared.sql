-- What a run really used: resolved commits, Dockerfile digest, image id,
-- preparing steps with durations, GPUs (from task.prepared).
ALTER TABLE tasks ADD COLUMN prepared jsonb;
