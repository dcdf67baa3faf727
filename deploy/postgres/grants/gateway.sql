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
GRANT SELECT, INSERT, UPDATE ON idempotency_keys, authorizations TO gateway_sim;
GRANT INSERT ON ledger TO gateway_sim;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO gateway_sim;
GRANT EXECUTE ON FUNCTION purge_expired_keys(float8, integer) TO gateway_sim;
