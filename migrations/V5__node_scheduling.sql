-- Whether the node takes new tasks (from node.scheduling): active, cordoned, draining.
ALTER TABLE nodes ADD COLUMN scheduling text NOT NULL DEFAULT 'active';
