-- Least privilege in the payments database (see orders.sql for how it is applied).
--
--   payment_svc     consumes the order events, moves money through the gateway
--   payments_relay  reads the outbox and marks what the broker acknowledged
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO payment_svc, payments_relay', current_database());
END
$$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM payment_svc, payments_relay;
GRANT USAGE ON SCHEMA public TO payment_svc, payments_relay;

-- A payment's order, id, amount, currency and creation time never change once written.
GRANT SELECT, INSERT ON payments TO payment_svc;
GRANT UPDATE (state, correlation_id, causation_id, traceparent, payment_token, lease_until, attempts,
              last_error, version, updated_at, authorization_id, failure_reason) ON payments TO payment_svc;
GRANT SELECT, INSERT ON inbox TO payment_svc;
GRANT INSERT ON outbox TO payment_svc;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO payment_svc;
GRANT EXECUTE ON FUNCTION purge_inbox(text, float8, integer) TO payment_svc;

GRANT SELECT, UPDATE (published_at, failed_attempts, last_error) ON outbox TO payments_relay;
GRANT EXECUTE ON FUNCTION purge_published_outbox(float8, integer) TO payments_relay;

-- The WAL-message outbox (docs/adr/0003): the relay records the slot it created and how far
-- it confirmed it (the slot itself needs the REPLICATION attribute, given by the deployment).
GRANT SELECT, INSERT, UPDATE ON outbox_wal_slot TO payments_relay;
