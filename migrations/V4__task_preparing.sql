-- The preparing step under way on the node (from task.preparing):
-- {"step", "since", "attempt"}; null once the run starts or ends.
ALTER TABLE tasks ADD COLUMN preparing jsonb;
