-- No remote call inside a database transaction (docs/adr/0005). An order event records what
-- it asks of the gateway as a *pending* payment state, committed with the message's inbox
-- row; the executor then claims it, calls the gateway with no transaction open, and records
-- the answer (the settled state and its event) in a second short transaction.
--
--   AUTHORIZING  an authorization is owed            -> AUTHORIZED | FAILED
--   CAPTURING    a capture is owed                   -> CAPTURED
--   VOIDING      a void is owed (by the authorization, or by the authorize key when none is
--                on record)                          -> VOIDED | CANCELLED_BEFORE_AUTHORIZATION
ALTER TABLE payments DROP CONSTRAINT payments_state_check;
ALTER TABLE payments ADD CONSTRAINT payments_state_check CHECK (state IN
    ('AUTHORIZING', 'AUTHORIZED', 'FAILED', 'CAPTURING', 'CAPTURED', 'VOIDING', 'VOIDED',
     'CANCELLED_BEFORE_AUTHORIZATION'));

ALTER TABLE payments
    -- The card token, kept only while the authorization is owed (a crash between the intent
    -- and the call must still be able to make it); cleared when the answer is recorded.
    ADD COLUMN payment_token text,
    -- The event that asked for the pending call (its correlation and message id, and the
    -- trace it continues): the answer's event is caused by it. NULL causation: a deadline.
    ADD COLUMN correlation_id uuid,
    ADD COLUMN causation_id uuid,
    ADD COLUMN traceparent text,
    -- A pending call is claimed by one executor until lease_until (NULL: unclaimed, due now).
    -- A claim that lapses (the executor died, or is slower than its lease) is taken again;
    -- every call carries the order's idempotency key, so a second call replays the first.
    ADD COLUMN lease_until timestamptz,
    -- Calls made for the current pending state, and the last one's failure.
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error text,
    ADD CONSTRAINT payments_token_only_while_authorizing
        CHECK (payment_token IS NULL OR state = 'AUTHORIZING');

-- The executor's claim reads only pending payments, oldest due first.
CREATE INDEX payments_pending ON payments (lease_until NULLS FIRST)
    WHERE state IN ('AUTHORIZING', 'CAPTURING', 'VOIDING');
