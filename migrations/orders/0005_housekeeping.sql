-- Housekeeping runs with its own rights. The service roles hold no DELETE on these tables
-- (deploy/postgres/grants/*.sql); they may only EXECUTE these functions, which run as the
-- database's owner and delete nothing younger than the function's own floor, whatever the
-- caller asks: a compromised service cannot empty its inbox (which would let every
-- redelivered message take effect again) nor its idempotency keys before they expire.
-- Each function keeps the search_path it was created with (the migration's schema), so a
-- caller's own search_path cannot point it at other tables.

-- Inbox rows of one consumer older than the retention (at least one hour), a batch at a time.
CREATE FUNCTION purge_inbox(p_consumer text, older_than_secs float8, batch integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM inbox WHERE consumer = p_consumer AND message_id IN (
            SELECT message_id FROM inbox
            WHERE consumer = p_consumer
              AND processed_at < now() - make_interval(secs => greatest(older_than_secs, 3600))
            LIMIT batch)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;
REVOKE ALL ON FUNCTION purge_inbox(text, float8, integer) FROM PUBLIC;

-- Published outbox rows older than the retention, a batch at a time (never an unpublished one).
CREATE FUNCTION purge_published_outbox(older_than_secs float8, batch integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM outbox WHERE id IN (
            SELECT id FROM outbox
            WHERE published_at < now() - make_interval(secs => greatest(older_than_secs, 0))
            ORDER BY id LIMIT batch)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;
REVOKE ALL ON FUNCTION purge_published_outbox(float8, integer) FROM PUBLIC;

-- PlaceOrder idempotency keys past their expiry (plus a grace), a batch at a time.
CREATE FUNCTION purge_expired_request_ids(grace_secs float8, batch integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM idempotency_keys WHERE request_id IN (
            SELECT request_id FROM idempotency_keys
            WHERE expires_at < now() - make_interval(secs => greatest(grace_secs, 0))
            LIMIT batch)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;
REVOKE ALL ON FUNCTION purge_expired_request_ids(float8, integer) FROM PUBLIC;
