-- The gateway simulator's own database: the truth about money. The invariant checker
-- counts charges here, never in the payment service's tables.

-- Every idempotency key the gateway has seen, with the reply it gave.
CREATE TABLE idempotency_keys (
    idempotency_key text        PRIMARY KEY,
    operation       text        NOT NULL,
    fingerprint     bytea       NOT NULL,
    response        bytea       NOT NULL,
    -- How many calls used this key (drives the per-attempt fault decisions).
    attempts        integer     NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);

CREATE TABLE authorizations (
    authorization_id uuid        PRIMARY KEY,
    order_id         text        NOT NULL,
    amount_minor     bigint      NOT NULL,
    currency_code    char(3)     NOT NULL,
    captured_minor   bigint      NOT NULL DEFAULT 0,
    state            text        NOT NULL CHECK (state IN ('AUTHORIZED', 'CAPTURED', 'VOIDED')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX authorizations_by_order ON authorizations (order_id);

-- Append-only: one row per operation that moved (or refused to move) money.
CREATE TABLE ledger (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT now(),
    operation        text        NOT NULL CHECK (operation IN ('AUTHORIZE', 'DECLINE', 'CAPTURE', 'VOID')),
    order_id         text        NOT NULL,
    authorization_id uuid,
    amount_minor     bigint      NOT NULL,
    currency_code    char(3)     NOT NULL,
    idempotency_key  text        NOT NULL
);
CREATE INDEX ledger_by_order ON ledger (order_id);
