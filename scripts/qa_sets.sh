#!/usr/bin/env bash
# Build the answer-training tasks and the held-out QA sets that the README's tables use, from
# the data folder (SQuAD v1.1 dev, NQ-open oracle, MTRAG-UN), with a refrag binary.
#
#   scripts/qa_sets.sh DATA_DIR OUT_DIR [REFRAG_BINARY]
#
# OUT_DIR/tasks: training tasks (SQuAD train articles with 0, 2 and 7 same-article distractors,
#   the NQ train split, MTRAG-UN tasks 101-507 that share no passage and no opening user turn
#   with the first 100 and are not unanswerable).
# OUT_DIR/test: nine held-out sets of 100 questions (SQuAD test articles: gold passage, gold + 2,
#   retrieved top 1/3/8; NQ test split: gold, top 1/3/8), the first 100 of a fixed shuffle, and
#   mtrag100.jsonl (MTRAG-UN's first 100 tasks); OUT_DIR/sq_test200.jsonl: 200 more SQuAD test
#   questions for `train sft --heldout-qa`.
# The split is refrag's own (`dataset --split`, a stable hash of the SQuAD article or the NQ
# question), so no test article or question reaches the training tasks. Indexing the two
# held-out corpora for the top-k sets takes ~5 minutes each on a 2-core CPU.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 DATA_DIR OUT_DIR [REFRAG_BINARY]" >&2
  exit 2
fi
DATA=$(realpath -m "$1")
OUT=$(realpath -m "$2")
B=$(realpath -m "${3:-$(command -v refrag || echo target/release/refrag)}")
for f in squad/dev-v1.1.json nq-open-oracle/nq-open-oracle.jsonl.gz mtrag/mtragun_human_generation_reference.jsonl; do
  [ -f "$DATA/$f" ] || { echo "$DATA/$f: not found" >&2; exit 2; }
done
[ -x "$B" ] || { echo "$B: no refrag binary (build it, or give its path)" >&2; exit 2; }
mkdir -p "$OUT/tasks" "$OUT/test" "$OUT/work"
W="$OUT/work"
SQ="$DATA/squad/dev-v1.1.json"
NQ="$DATA/nq-open-oracle/nq-open-oracle.jsonl.gz"

for n in 0 2 7; do
  name=sq_train$([ $n = 0 ] || echo $((n + 1)))
  "$B" -q dataset squad "$SQ" --split train --distractors $n --tasks "$OUT/tasks/$name.jsonl"
done
"$B" -q dataset nq-oracle "$NQ" --split train --tasks "$OUT/tasks/nq_train.jsonl"

"$B" -q dataset squad "$SQ" --split test --corpus "$W/sq_corpus.jsonl" --questions "$W/sq_q.jsonl" --tasks "$W/sq_gold.jsonl"
"$B" -q dataset squad "$SQ" --split test --distractors 2 --tasks "$W/sq_gold3.jsonl"
"$B" -q dataset nq-oracle "$NQ" --split test --corpus "$W/nq_corpus.jsonl" --questions "$W/nq_q.jsonl" --tasks "$W/nq_gold.jsonl"

python3 - "$W" "$OUT" "$DATA/mtrag/mtragun_human_generation_reference.jsonl" <<'EOF'
import json, random, sys
work, out, mtrag = sys.argv[1:4]

def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]

def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

# The first 100 of a fixed shuffle of each test split's questions; the gold sets follow it.
for src, golds in [("sq", ["sq_gold", "sq_gold3"]), ("nq", ["nq_gold"])]:
    qs = read(f"{work}/{src}_q.jsonl")
    random.Random(20).shuffle(qs)
    write(f"{work}/{src}_q100.jsonl", qs[:100])
    for gold in golds:
        by_id = {t["task_id"]: t for t in read(f"{work}/{gold}.jsonl")}
        tasks = [by_id[q["id"]] for q in qs if q["id"] in by_id]
        write(f"{out}/test/{gold}.jsonl", tasks[:100])
        if gold == "sq_gold":
            write(f"{out}/sq_test200.jsonl", tasks[100:300])

# MTRAG-UN: the first 100 tasks are held out; training takes the later ones that share no
# reference passage and no opening user turn with them, have passages and a reference, and are
# not unanswerable.
lines = [line for line in open(mtrag, encoding="utf-8") if line.strip()]
rows = [json.loads(line) for line in lines]
docs = lambda r: {c["document_id"] for c in r.get("contexts") or []}
opening = lambda r: next((t["text"] for t in r["input"] if t["speaker"] == "user"), "")
held_docs = set().union(*(docs(r) for r in rows[:100]))
held_open = {opening(r) for r in rows[:100]}
train = [line for line, r in zip(lines[100:], rows[100:])
         if not docs(r) & held_docs and opening(r) not in held_open
         and r["answerability"][0] != "UNANSWERABLE" and r.get("contexts") and r.get("targets")]
open(f"{out}/tasks/mt_train.jsonl", "w", encoding="utf-8").write("".join(train))
open(f"{out}/test/mtrag100.jsonl", "w", encoding="utf-8").write("".join(lines[:100]))
print(f"mt_train: {len(train)} tasks")
EOF

"$B" -q index "$W/sq_corpus.jsonl" --db "$W/sqdb"
"$B" -q index "$W/nq_corpus.jsonl" --db "$W/nqdb"
for k in 1 3 8; do
  "$B" -q eval --db "$W/sqdb" --questions "$W/sq_q100.jsonl" --retrieval-only --top-k $k --tasks "$OUT/test/sq_top$k.jsonl" > /dev/null
  "$B" -q eval --db "$W/nqdb" --questions "$W/nq_q100.jsonl" --retrieval-only --top-k $k --tasks "$OUT/test/nq_top$k.jsonl" > /dev/null
done
wc -l "$OUT"/tasks/*.jsonl "$OUT"/test/*.jsonl
