-- The read model shows each order's version as its events carry it (OrderConfirmed and
-- OrderCancelled name the version they lead to; an order is at version 0 when placed),
-- never one computed from its status.
ALTER TABLE order_read ADD COLUMN version bigint NOT NULL DEFAULT 0;

-- Rows of settled orders projected before the events carried a version: the write model's
-- version, which is what those events would have carried (a settled order changes no more).
-- A settling event written by an older order-svc and projected after this migration carries
-- no version (it reads 0; the projector keeps the row's): run this statement again once the
-- upgrade's events have drained (docs/runbook.md, "Upgrading to the read model's version").
UPDATE order_read r SET version = o.version
FROM orders o
WHERE o.order_id = r.order_id AND r.status <> 'PENDING' AND o.status <> 'PENDING';
