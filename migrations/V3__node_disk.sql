-- Free disk space and the low-disk flag from each node's last heartbeat.
ALTER TABLE nodes ADD COLUMN disk_free_mb bigint;
ALTER TABLE nodes ADD COLUMN low_disk boolean NOT NULL DEFAULT false;
