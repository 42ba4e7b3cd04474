-- A transaction's step records live in its own row, as a JSON array appended in place
-- (docs/decisions.md, "Step records in the transaction row"). Each step commit used to insert
-- one `tx_steps` row per record: a heap tuple, a primary-key entry, a foreign-key lock on the
-- transaction's row and a fencing lookup of that same row. Appending to the row is one fenced
-- update, which PostgreSQL can keep on the same page (HOT: no index entry) as long as the
-- page has room: hence the fill factor.
--
-- `tx_steps` stays, as a view with the same columns, so that recovery, the audit sweep,
-- operators' queries and docs/operations.md read the records exactly as before. Each array
-- element is an object with the keys seq, kind, path, at and, when they have a value,
-- provider, action, input, output, rollback_data, error, procedure: a missing key reads as
-- SQL NULL, a JSON null stays a JSON null (as in the table).
ALTER TABLE transactions ADD COLUMN steps jsonb NOT NULL DEFAULT '[]';
ALTER TABLE transactions SET (fillfactor = 70);

UPDATE transactions t
   SET steps = s.records
  FROM (SELECT tx_id,
               jsonb_agg(jsonb_build_object('seq', seq, 'kind', kind, 'path', path, 'at', at,
                                            'provider', provider, 'action', action, 'input', input,
                                            'output', output, 'rollback_data', rollback_data,
                                            'error', error, 'procedure', procedure)
                         - array_remove(ARRAY[
                               CASE WHEN provider IS NULL THEN 'provider' END,
                               CASE WHEN action IS NULL THEN 'action' END,
                               CASE WHEN input IS NULL THEN 'input' END,
                               CASE WHEN output IS NULL THEN 'output' END,
                               CASE WHEN rollback_data IS NULL THEN 'rollback_data' END,
                               CASE WHEN error IS NULL THEN 'error' END,
                               CASE WHEN procedure IS NULL THEN 'procedure' END], NULL)
                         ORDER BY seq) AS records
          FROM tx_steps GROUP BY tx_id) s
 WHERE t.id = s.tx_id;

DROP TABLE tx_steps;

CREATE VIEW tx_steps AS
SELECT t.id                          AS tx_id,
       (e ->> 'seq')::integer        AS seq,
       e ->> 'kind'                  AS kind,
       e ->> 'path'                  AS path,
       e ->> 'provider'              AS provider,
       e ->> 'action'                AS action,
       e -> 'input'                  AS input,
       e -> 'output'                 AS output,
       e -> 'rollback_data'          AS rollback_data,
       e -> 'error'                  AS error,
       (e ->> 'at')::timestamptz     AS at,
       e ->> 'procedure'             AS procedure
  FROM transactions t
 CROSS JOIN LATERAL jsonb_array_elements(t.steps) AS e;
