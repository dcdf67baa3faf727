-- Least privilege in the orders database. Applied by the database's owner after the
-- migrations (scripts/stack up; the tests in tests/least_privilege.rs apply the same file).
-- Roles are created by the deployment (scripts/stack creates each with its own password);
-- none of them owns anything, none can change the schema, none can connect to another
-- service's database (CONNECT is revoked from PUBLIC and granted per role).
--
--   order_svc        the gRPC API, the saga consumer and its sweeper
--   orders_relay     reads the outbox and marks what the broker acknowledged
--   orders_projector writes the read model (and reads the order ids it may project)
--
-- Deleting old rows is housekeeping's, which runs with its own rights: the purge_*
-- functions (migrations/orders/0005_housekeeping.sql), never DELETE on a table.
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO order_svc, orders_relay, orders_projector', current_database());
END
$$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM order_svc, orders_relay, orders_projector;
GRANT USAGE ON SCHEMA public TO order_svc, orders_relay, orders_projector;

-- UPDATE names its columns where a table's promise depends on the others: an order's
-- customer, items, total and creation time (the saga deadline's start) never change once
-- written. An idempotency key's columns may all be rewritten, but only once it has expired
-- (the insert reclaims an expired key): a trigger (migrations/orders/0010) refuses any change
-- to a live key, so its retention cannot be shortened before the purge.
GRANT SELECT, INSERT ON orders, idempotency_keys TO order_svc;
GRANT UPDATE (status, saga_state, cancellation_reason, version, updated_at, settled_at) ON orders TO order_svc;
GRANT UPDATE (request_fingerprint, order_id, response, created_at, expires_at) ON idempotency_keys TO order_svc;
GRANT SELECT, INSERT ON order_items, inbox TO order_svc;
GRANT INSERT ON outbox TO order_svc;
GRANT SELECT ON order_read TO order_svc;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO order_svc;
GRANT EXECUTE ON FUNCTION purge_inbox(text, float8, integer), purge_expired_request_ids(float8, integer) TO order_svc;

-- The relay locks the unpublished rows it publishes (FOR UPDATE needs UPDATE), sets their
-- published_at, and records a failed delivery on the row (failed_attempts, last_error); it
-- cannot write an event, nor read an order.
GRANT SELECT, UPDATE (published_at, failed_attempts, last_error) ON outbox TO orders_relay;
GRANT EXECUTE ON FUNCTION purge_published_outbox(float8, integer) TO orders_relay;

GRANT SELECT, INSERT, UPDATE ON order_read TO orders_projector;
GRANT SELECT, INSERT ON inbox TO orders_projector;
GRANT SELECT (order_id) ON orders TO orders_projector;
GRANT EXECUTE ON FUNCTION purge_inbox(text, float8, integer) TO orders_projector;

-- The WAL-message outbox (docs/adr/0003): the relay records the slot it created and how far
-- it confirmed it (the slot itself needs the REPLICATION attribute, given by the deployment).
GRANT SELECT, INSERT, UPDATE ON outbox_wal_slot TO orders_relay;
