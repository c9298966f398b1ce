-- When a task's live run started, and the GPU time its ended runs used per
-- month ({"2026-12": milliseconds}): what quotas and usage figures read.
ALTER TABLE tasks ADD COLUMN started_at timestamptz;
ALTER TABLE tasks ADD COLUMN gpu_ms jsonb;
CREATE INDEX tasks_gpu_ms ON tasks USING gin (gpu_ms) WHERE gpu_ms IS NOT NULL;
