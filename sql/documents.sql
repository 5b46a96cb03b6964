-- Item documents: the text each item's semantic vector is encoded from.
-- {{item_text}} is the store's document expression over item columns
-- (`dynstore init --item-text`, `dynstore config --item-text`); by default
-- every text-like column rendered as "name: value", one per line.
-- {{behaviour}} is empty unless the behaviour summary is switched on.
SELECT i.item_id,
       nullif(concat_ws(E'\n', ({{item_text}}), {{behaviour}}), '') AS document
FROM items i
{{behaviour_join}}
