-- The pipeline a run follows, as it was when the run was submitted (JSON `PipelineSpec`):
-- reloading the configuration changes new runs, never the ones under way. NULL for runs
-- made before this migration, which follow the server's pipeline of that name.
ALTER TABLE runs ADD COLUMN pipeline_spec TEXT;
-- Who submitted the run (`local` in local mode); usage is reported per submitter.
ALTER TABLE runs ADD COLUMN submitted_by TEXT;
