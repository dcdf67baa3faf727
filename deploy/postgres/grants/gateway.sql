-- Least privilege in the gateway simulator's database (see orders.sql for how it is
-- applied). The ledger is append-only for the simulator: it may add lines, never change or
-- delete one (and it never needs to read them: the invariant checker does, as the owner).
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO gateway_sim', current_database());
END
$$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM gateway_sim;
GRANT USAGE ON SCHEMA public TO gateway_sim;
-- UPDATE names its columns: a key's operation, fingerprint and expiry (its retention, which
-- the purge counts on) and an authorization's order, amount and currency never change once
-- written; the ledger is append-only.
GRANT SELECT, INSERT ON idempotency_keys, authorizations TO gateway_sim;
GRANT UPDATE (attempts, response) ON idempotency_keys TO gateway_sim;
GRANT UPDATE (state, captured_minor, updated_at) ON authorizations TO gateway_sim;
GRANT INSERT ON ledger TO gateway_sim;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO gateway_sim;
GRANT EXECUTE ON FUNCTION purge_expired_keys(float8, integer) TO gateway_sim;
