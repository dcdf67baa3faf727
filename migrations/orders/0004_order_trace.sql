-- The W3C trace context of the PlaceOrder call, so that events emitted later without a
-- causing message (the sweeper's OrderCancelled) continue the order's one trace.
ALTER TABLE orders ADD COLUMN traceparent text;
