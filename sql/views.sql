-- Views over the store's Lance datasets. Loaded by every dynstore connection;
-- {{...}} placeholders are filled from dynstore.toml.

-- label: 1 positive, -1 negative, 0 neither, by the store's labelling rules.
CREATE OR REPLACE VIEW interactions AS
SELECT *, {{label}} AS label
FROM _dynstore_interactions;

-- The events a model learns from and serves with; the one place that decides it:
-- labelled positives and negatives, and shown-but-ignored impressions (label 0):
-- an impression is dropped when the same user has a positive on the same item at
-- or after it (the positive says it all); other events the rules leave at 0 are
-- neither liked nor disliked and count for nothing.
-- labelled_events_since(cutoff): those of the events at or after `cutoff` (NULL:
-- all). A positive that drops an impression of the window is at or after it, so in
-- the window too: both scans read only the window (the filter reaches the Lance
-- scan), and the answer is that of `labelled_events WHERE ts >= cutoff`.
CREATE OR REPLACE MACRO labelled_events_since(cutoff) AS TABLE
WITH last_pos AS (
    SELECT user_id, item_id, max(ts) AS ts FROM interactions
    WHERE label = 1 AND (cutoff IS NULL OR ts >= cutoff) GROUP BY ALL
)
SELECT i.user_id, i.item_id, i.ts,
       CAST(CASE WHEN i.event = 'impression' THEN 0 ELSE i.label END AS TINYINT) AS label
FROM interactions i LEFT JOIN last_pos p USING (user_id, item_id)
WHERE (cutoff IS NULL OR i.ts >= cutoff)
  AND CASE WHEN i.event = 'impression' THEN p.ts IS NULL OR p.ts < i.ts ELSE i.label <> 0 END;

CREATE OR REPLACE VIEW labelled_events AS SELECT * FROM labelled_events_since(NULL);

CREATE OR REPLACE VIEW items AS SELECT * FROM _dynstore_items;

CREATE OR REPLACE VIEW users AS SELECT * FROM _dynstore_users;

-- Each item's document (the text the encoder sees) and its hash.
CREATE OR REPLACE VIEW item_documents AS
SELECT item_id, document, md5(coalesce(document, '')) AS doc_hash
FROM ({{item_document}});

-- Items whose current document has no cached vector for the store's encoder.
CREATE OR REPLACE VIEW stale_items AS
SELECT d.item_id, d.document, d.doc_hash
FROM item_documents d
ANTI JOIN _dynstore_semantic c ON c.doc_hash = d.doc_hash;

-- status: serving (current, retired, candidate, rejected); verdict: what refresh
-- decided (initial, promoted, passed, rejected, rule), kept across rollbacks.
CREATE OR REPLACE VIEW versions AS
SELECT version, parent, status, verdict, created, encoder, alpha, train_window, counts, metrics
FROM _dynstore_versions;

-- Fused item embeddings of every version, and of the current one. Rows of a
-- version whose registry commit never happened (a killed refresh) are not shown.
CREATE OR REPLACE VIEW item_embeddings_all AS
SELECT version, item_id, vector, bias FROM _dynstore_embeddings
WHERE version IN (SELECT version FROM _dynstore_versions);

CREATE OR REPLACE VIEW item_embeddings AS
SELECT e.item_id, e.vector, e.bias
FROM _dynstore_embeddings e
WHERE e.version = (SELECT max(version) FROM _dynstore_versions WHERE status = 'current');

-- Every user's top-k of one version, as the last `dynstore score-all` wrote it
-- (one overwrite commit per run: a reader sees the old table or the new one whole).
CREATE OR REPLACE VIEW batch_recommendations AS
SELECT user_id, rank, item_id, score, version FROM _dynstore_batch_recommendations;
