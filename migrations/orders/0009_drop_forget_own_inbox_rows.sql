-- The consumer runtime no longer takes inbox rows back: a unit of work either commits a
-- message's effect with its inbox row or leaves both out (nothing is deferred any more, since
-- no handler calls a remote service inside its transaction). The function that let a
-- service role delete the inbox rows of its own transaction goes with that.
DROP FUNCTION IF EXISTS forget_own_inbox_rows(text, uuid[]);
