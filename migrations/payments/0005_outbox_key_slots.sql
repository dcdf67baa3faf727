-- Several polling relays on one database (docs/adr/0003): every outbox row belongs to one of
-- 64 key slots, a hash of its partition key, so all events of one order share a slot. A relay
-- publishes only the slots it holds (session advisory locks on the connection it publishes
-- on), so each key has one publisher at a time and its events leave in id order, while
-- different slots are published concurrently by different relays.
--
-- 64 is part of the schema: every relay must agree on it (relay::KEY_SLOTS). hashtext is
-- immutable within a Postgres major version; a row's slot is fixed when it is written.
ALTER TABLE outbox
    ADD COLUMN key_slot smallint NOT NULL GENERATED ALWAYS AS ((hashtext(partition_key) & 63)::smallint) STORED;
