-- The inbox: a consumer records each message id in the same transaction as the message's
-- effect, so a redelivered message is a no-op. Its retention is the deduplication window.
CREATE TABLE inbox (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_by_age ON inbox (processed_at);

-- The read model (query side), maintained by the projector from orders.events and
-- payments.events. GetOrder serves it. Every column is set from events only.
CREATE TABLE order_read (
    order_id            uuid        PRIMARY KEY,
    customer_id         bigint,
    currency_code       char(3),
    total_minor         bigint,
    items               jsonb,
    status              text        NOT NULL DEFAULT 'PENDING',
    saga_state          text        NOT NULL DEFAULT 'AWAITING_PAYMENT',
    cancellation_reason text,
    payment_state       text,
    correlation_id      uuid,
    last_event_type     text        NOT NULL,
    -- [{"event_type": ..., "occurred_at": ..., "message_id": ...}], oldest first, at most 50.
    history             jsonb       NOT NULL DEFAULT '[]',
    placed_at           timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- When the projector wrote the row last (for the convergence measurement).
    projected_at        timestamptz NOT NULL DEFAULT now()
);

-- When an order reached its terminal state (the saga completion measurement).
ALTER TABLE orders ADD COLUMN settled_at timestamptz;
