-- The variables of the environment a run executes in (ports, service addresses), handed to
-- its agents with every task. JSON object; NULL when it has none.
ALTER TABLE runs ADD COLUMN variables TEXT;
