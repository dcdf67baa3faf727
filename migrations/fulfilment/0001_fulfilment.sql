-- The fulfilment hand-off: exactly one shipment request per confirmed order.
CREATE TABLE shipments (
    shipment_id  uuid        PRIMARY KEY,
    order_id     uuid        NOT NULL UNIQUE,
    requested_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE inbox (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_by_age ON inbox (processed_at);
