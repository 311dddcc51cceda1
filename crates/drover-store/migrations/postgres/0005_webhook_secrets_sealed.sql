-- Webhook signing secrets are sealed like project secrets: an AEAD ciphertext under the
-- master key `secret_key_id` names, with a random nonce, and the project and endpoint as
-- associated data. The key is kept outside the database, so the database alone no longer
-- lets anyone sign deliveries.
--
-- Endpoints made before keep their plaintext secret in `legacy_secret` until a server
-- seals it at its next start (before it serves) and clears the column; nothing else reads
-- it. New endpoints never have one.

ALTER TABLE webhooks RENAME COLUMN secret TO legacy_secret;
ALTER TABLE webhooks ALTER COLUMN legacy_secret DROP NOT NULL;
ALTER TABLE webhooks
    ADD COLUMN secret_key_id TEXT,
    ADD COLUMN secret_nonce BYTEA,
    ADD COLUMN secret_ciphertext BYTEA;
