-- Why a pending task is not placed yet (from task.waiting); null once placed.
ALTER TABLE tasks ADD COLUMN waiting_reason text;
