-- Several transaction-log servers: which server holds a request's current attempt, and which
-- process may still decide its outcome. With separate log servers the request row (here, in
-- the configuration database) and the transaction row (on its server) cannot be written in
-- one commit: the request row is then where an attempt's outcome is decided, and `tx_owner`
-- fences it (recovery takes it over before rolling the attempt back).
ALTER TABLE requests ADD COLUMN tx_server text;
ALTER TABLE requests ADD COLUMN tx_owner text;
