-- One payment per order, whatever happens: order_id is UNIQUE.
CREATE TABLE payments (
    payment_id       uuid        PRIMARY KEY,
    order_id         uuid        NOT NULL UNIQUE,
    amount_minor     bigint      NOT NULL,
    currency_code    char(3)     NOT NULL,
    -- AUTHORIZED, FAILED, CAPTURED, VOIDED, or CANCELLED_BEFORE_AUTHORIZATION: the order was
    -- cancelled before any payment was attempted, so a later OrderPlaced must never charge.
    state            text        NOT NULL CHECK (state IN
                       ('AUTHORIZED', 'FAILED', 'CAPTURED', 'VOIDED', 'CANCELLED_BEFORE_AUTHORIZATION')),
    authorization_id text,
    failure_reason   text,
    version          bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE inbox (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_by_age ON inbox (processed_at);
