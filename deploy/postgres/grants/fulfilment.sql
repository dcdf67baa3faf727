-- Least privilege in the fulfilment database (see orders.sql for how it is applied).
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO fulfilment_svc', current_database());
END
$$;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM fulfilment_svc;
GRANT USAGE ON SCHEMA public TO fulfilment_svc;
GRANT SELECT, INSERT ON shipments, inbox TO fulfilment_svc;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO fulfilment_svc;
GRANT EXECUTE ON FUNCTION purge_inbox(text, float8, integer) TO fulfilment_svc;
