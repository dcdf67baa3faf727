-- A consumer's batch records the inbox rows of all its messages first, then may leave some
-- messages out (deferred: handled alone once the batch commits). Their rows must go before
-- the commit, or the message's own handling would find itself processed. The service roles
-- hold no DELETE on the inbox (see the housekeeping migration): this function, running as the owner,
-- deletes only rows the calling transaction itself inserted (their xmin is its transaction
-- id; the runtime records inbox rows in the top-level transaction, never in a savepoint), so
-- a committed row, that is a processed message, can never be taken back through it.
CREATE FUNCTION forget_own_inbox_rows(p_consumer text, p_message_ids uuid[]) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH gone AS (
        DELETE FROM inbox
        WHERE consumer = p_consumer AND message_id = ANY(p_message_ids)
          AND xmin::text::bigint = pg_current_xact_id()::text::bigint % 4294967296
        RETURNING 1)
    SELECT count(*) FROM gone
$$;
REVOKE ALL ON FUNCTION forget_own_inbox_rows(text, uuid[]) FROM PUBLIC;
