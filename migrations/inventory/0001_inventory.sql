-- The inventory service's database (docs/adr/0007): stock per SKU, reservations per order, and
-- the contracts every service database keeps (the inbox, the outbox and their housekeeping),
-- here in their current form at once rather than in the steps the other databases took.

-- Counts per SKU. What is available is on_hand - reserved - sold; the CHECK makes an oversell
-- a refused statement, whatever the code above it does.
CREATE TABLE stock (
    sku       text    PRIMARY KEY,
    on_hand   bigint  NOT NULL CHECK (on_hand >= 0),
    reserved  bigint  NOT NULL DEFAULT 0,
    sold      bigint  NOT NULL DEFAULT 0,
    CONSTRAINT stock_never_oversold CHECK (reserved >= 0 AND sold >= 0 AND reserved + sold <= on_hand)
);

-- One row per order inventory has heard of. `lines` is the order's demand, an object of
-- SKU to units (empty for a cancellation that came before the order); what the counts hold
-- for the order follows from the state (RESERVED: held; COMMITTED: sold; anything else:
-- nothing).
CREATE TABLE reservations (
    order_id    uuid        PRIMARY KEY,
    state       text        NOT NULL CHECK (state IN ('RESERVED', 'REJECTED', 'COMMITTED', 'RELEASED', 'EXPIRED', 'SHORT', 'DISPATCHED')),
    lines       jsonb       NOT NULL,
    expires_at  timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reservation_lines_are_units CHECK (
        jsonb_typeof(lines) = 'object'
        AND NOT jsonb_path_exists(lines, '$.* ? (@.type() != "number" || @ <= 0 || @.floor() != @)')),
    -- Only a cancellation that came before its order holds no lines.
    CONSTRAINT reservation_lines_only_empty_when_released CHECK (lines <> '{}'::jsonb OR state = 'RELEASED'),
    -- Only a held reservation has a deadline: the sweeper's index covers nothing else.
    CONSTRAINT reservation_deadline_only_while_held CHECK ((state = 'RESERVED') = (expires_at IS NOT NULL))
);
CREATE INDEX reservations_expiring ON reservations (expires_at) WHERE state = 'RESERVED';

CREATE TABLE inbox (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_by_age ON inbox (processed_at);

-- The transactional outbox, as in every service database (migrations/orders/0002, 0006, 0007).
CREATE TABLE outbox (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid        NOT NULL UNIQUE,
    topic           text        NOT NULL,
    partition_key   text        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    traceparent     text,
    payload         bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    failed_attempts integer     NOT NULL DEFAULT 0,
    last_error      text,
    key_slot        smallint    NOT NULL GENERATED ALWAYS AS ((hashtext(partition_key) & 63)::smallint) STORED
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'orderflow_outbox') THEN
        CREATE PUBLICATION orderflow_outbox;
    END IF;
END
$$;
CREATE TABLE outbox_wal_slot (
    slot_name     text        PRIMARY KEY,
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_lsn   pg_lsn      NOT NULL,
    confirmed_lsn pg_lsn,
    confirmed_at  timestamptz
);

-- Housekeeping with the owner's rights and its own floors (migrations/payments/0003 says why).
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
