-- Macros over dynstore's Python functions. Loaded by every connection.

-- recommend(user_id, k[, version]) -> STRUCT(item_id, score)[], best first.
CREATE OR REPLACE MACRO recommend(user_id, k) AS _dynstore_recommend(user_id, k, NULL),
                                 (user_id, k, version) AS _dynstore_recommend(user_id, k, version);

-- item_vector(item_id[, version]) -> the fused vector w_i.
CREATE OR REPLACE MACRO item_vector(item_id) AS _dynstore_item_vector(item_id, NULL),
                                   (item_id, version) AS _dynstore_item_vector(item_id, version);

-- recommendations(user_id, k): the same list as a table (rank, item_id, score),
-- so `JOIN items USING (item_id)` reads naturally.
CREATE OR REPLACE MACRO recommendations(user_id, k) AS TABLE
SELECT i AS rank, l[i].item_id AS item_id, l[i].score AS score
FROM (SELECT recommend(user_id, k) AS l) r, range(1, len(r.l) + 1) t(i)
ORDER BY rank;
