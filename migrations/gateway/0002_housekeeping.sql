-- Housekeeping runs with its own rights. The service roles hold no DELETE on these tables
-- (deploy/postgres/grants/*.sql); they may only EXECUTE these functions, which run as the
-- database's owner and delete nothing younger than the function's own floor, whatever the
-- caller asks: a compromised service cannot empty its inbox (which would let every
-- redelivered message take effect again) nor its idempotency keys before they expire.
-- Each function keeps the search_path it was created with (the migration's schema), so a
-- caller's own search_path cannot point it at other tables.

-- Gateway idempotency keys past their expiry (plus a grace), a batch at a time.
CREATE FUNCTION purge_expired_keys(grace_secs float8, batch integer) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM idempotency_keys WHERE idempotency_key IN (
            SELECT idempotency_key FROM idempotency_keys
            WHERE expires_at < now() - make_interval(secs => greatest(grace_secs, 0))
            LIMIT batch)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;
REVOKE ALL ON FUNCTION purge_expired_keys(float8, integer) FROM PUBLIC;
