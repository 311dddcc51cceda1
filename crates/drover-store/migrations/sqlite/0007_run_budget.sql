-- What a run's stages may spend together (`{"tokens": N, "cost_usd": X}`); NULL: no limit.
ALTER TABLE runs ADD COLUMN budget TEXT;
