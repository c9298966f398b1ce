-- The outputs a task's last run left in the object store (task.outputs).
ALTER TABLE tasks ADD COLUMN outputs jsonb;
