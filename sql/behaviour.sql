-- Behaviour summary of each item from recent positive interactions: the items
-- most often picked by the same users, and the item's dominant audience.
-- The window counts back from the newest interaction, so replayed history
-- behaves like live data. Appended to the item document when
-- `behaviour_summary = true`, so a change in behaviour re-encodes the item.
WITH recent AS (
    SELECT user_id, item_id
    FROM interactions
    WHERE label = 1
      AND ts >= (SELECT max(ts) FROM interactions) - INTERVAL '{{window_days}} days'
    GROUP BY ALL
),
pairs AS (
    SELECT a.item_id, b.item_id AS other, count(*) AS n
    FROM recent a JOIN recent b ON a.user_id = b.user_id AND a.item_id <> b.item_id
    GROUP BY ALL
),
top_pairs AS (
    SELECT p.item_id,
           string_agg(coalesce(CAST({{title}} AS VARCHAR), CAST(p.other AS VARCHAR)), '; '
                      ORDER BY p.n DESC, p.other) AS picked_with
    FROM (SELECT *, row_number() OVER (PARTITION BY item_id ORDER BY n DESC, other) AS r FROM pairs) p
    LEFT JOIN items o ON o.item_id = p.other
    WHERE p.r <= 3
    GROUP BY p.item_id
),
audience AS (
    SELECT item_id, arg_max(segment, n) AS segment
    FROM (SELECT r.item_id, {{segment}} AS segment, count(*) AS n
          FROM recent r LEFT JOIN users u USING (user_id)
          GROUP BY ALL)
    WHERE segment IS NOT NULL AND segment <> ''
    GROUP BY item_id
)
SELECT coalesce(t.item_id, a.item_id) AS item_id,
       concat_ws(E'\n',
                 CASE WHEN t.picked_with IS NOT NULL THEN 'picked with: ' || t.picked_with END,
                 CASE WHEN a.segment IS NOT NULL THEN 'audience: ' || a.segment END) AS summary
FROM top_pairs t FULL JOIN audience a USING (item_id)
