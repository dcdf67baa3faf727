-- The WAL-message outbox (OUTBOX_MODE=wal-message, docs/adr/0003): events are logical
-- decoding messages written in the business transaction, read by the relay from a logical
-- replication slot.
--
-- pgoutput's stream must name a publication; this one publishes no table (the messages are
-- sent whatever the publication holds), so no row change of this database leaves it.
-- Publications belong to the database, not a schema: the benchmark's scratch database holds
-- every service's schema at once, hence "if not there yet".
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'orderflow_outbox') THEN
        CREATE PUBLICATION orderflow_outbox;
    END IF;
END
$$;

-- The slot the relay created, remembered here so that a slot that disappears (dropped, or
-- invalidated past max_slot_wal_keep_size) is noticed and reported, never silently replaced
-- by a new one that starts after the events the old one still held. One row per slot; the
-- relay sets confirmed_* as the slot advances (its age is the slot's lag in seconds, also
-- while no relay runs).
CREATE TABLE outbox_wal_slot (
    slot_name     text        PRIMARY KEY,
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_lsn   pg_lsn      NOT NULL,
    confirmed_lsn pg_lsn,
    confirmed_at  timestamptz
);
