-- A run may execute in an environment: its workspace, its services, its activity.
ALTER TABLE runs ADD COLUMN environment_id TEXT;
ALTER TABLE runs ADD COLUMN workspace TEXT;
