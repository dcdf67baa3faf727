-- A live idempotency key is a promise: a PlaceOrder retried within its retention gets the
-- first answer, and housekeeping's purge deletes it only once it has expired. order-svc's
-- insert may reclaim an expired key (ON CONFLICT ... WHERE expires_at < now()), but nothing
-- may change a live one: not its answer, and not its expiry, which would let the purge delete
-- it early. A column grant cannot say "only once expired"; this trigger does, for every role
-- (the table's owner can drop it; order_svc cannot).
CREATE FUNCTION refuse_change_to_live_idempotency_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.expires_at >= now() THEN
        RAISE EXCEPTION 'idempotency key % is live until %: it cannot be changed', OLD.request_id, OLD.expires_at
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION refuse_change_to_live_idempotency_key() FROM PUBLIC;

CREATE TRIGGER live_idempotency_keys_are_immutable BEFORE UPDATE ON idempotency_keys
    FOR EACH ROW EXECUTE FUNCTION refuse_change_to_live_idempotency_key();
