-- The payment service's database: the same outbox contract as every service database.

-- The transactional outbox. A row is inserted in the same transaction as the change it
-- describes; the relay publishes it and sets published_at once the broker acknowledged.
-- Unpublished rows are found by the flag (published_at IS NULL), never by remembering a
-- "last published id": ids are handed out before commit, so a lower id can become
-- visible after a higher one.

CREATE TABLE outbox (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id     uuid        NOT NULL UNIQUE,
    topic          text        NOT NULL,
    partition_key  text        NOT NULL,
    event_type     text        NOT NULL,
    schema_version integer     NOT NULL,
    traceparent    text,
    -- The encoded orderflow.events.v1.EventEnvelope.
    payload        bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    -- Publish attempts that failed permanently for this row, and the last such error.
    failed_attempts integer    NOT NULL DEFAULT 0,
    last_error     text
);

-- Only unpublished rows are ever scanned: the index stays small however big the table gets.
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Wake the relay when a transaction that inserted outbox rows commits (NOTIFY is
-- delivered at commit, and never for a rolled-back transaction).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
