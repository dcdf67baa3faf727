-- The order service's database. Nobody but the order service (and its relay) reads it.

CREATE TABLE orders (
    order_id        uuid        PRIMARY KEY,
    customer_id     bigint      NOT NULL CHECK (customer_id > 0),
    currency_code   char(3)     NOT NULL,
    total_minor     bigint      NOT NULL CHECK (total_minor > 0),
    payment_token   text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    saga_state      text        NOT NULL CHECK (saga_state IN ('AWAITING_PAYMENT', 'COMPLETED', 'COMPENSATED')),
    cancellation_reason text    CHECK (cancellation_reason IN ('PAYMENT_FAILED', 'PAYMENT_TIMEOUT', 'CUSTOMER_REQUEST')),
    -- Optimistic concurrency: every state change is UPDATE ... WHERE version = $expected.
    version         bigint      NOT NULL DEFAULT 0,
    correlation_id  uuid        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- The timeout sweeper looks only at pending orders, oldest first.
CREATE INDEX orders_pending_by_age ON orders (created_at) WHERE status = 'PENDING';

CREATE TABLE order_items (
    order_id         uuid    NOT NULL REFERENCES orders (order_id),
    line_no          integer NOT NULL CHECK (line_no >= 0),
    sku              text    NOT NULL,
    quantity         integer NOT NULL CHECK (quantity > 0),
    unit_price_minor bigint  NOT NULL CHECK (unit_price_minor > 0),
    PRIMARY KEY (order_id, line_no)
);

-- PlaceOrder idempotency keys (AIP-155 request_id). A key is honoured until expires_at,
-- at least 24 hours after first use; cleanup deletes expired keys in small batches.
CREATE TABLE idempotency_keys (
    request_id          text        PRIMARY KEY,
    -- The request without its request_id, encoded: a retry must match it byte for byte.
    request_fingerprint bytea       NOT NULL,
    -- Deferred: the key is claimed first (so concurrent retries wait on it), the order after.
    order_id            uuid        NOT NULL REFERENCES orders (order_id) DEFERRABLE INITIALLY DEFERRED,
    -- The encoded PlaceOrderResponse returned the first time.
    response            bytea       NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);
