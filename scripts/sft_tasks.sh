#!/usr/bin/env bash
# Build the answer-training mixture of `weights/qa` (session 24's recipe) from the data folder,
# with a refrag binary:
#
#   scripts/sft_tasks.sh DATA_DIR NQ_TRAIN OUT.jsonl [REFRAG_BINARY]
#
# DATA_DIR/squad-train: SQuAD v1.1 train, evaluation-clean (no article of it is a dev article).
# NQ_TRAIN: the NQ-open oracle train split's tasks (scripts/qa_sets.sh writes it to
#   OUT_DIR/tasks/nq_train.jsonl; refrag's own split, so no test question is in it).
# OUT.jsonl: 7,500 SQuAD-train questions with their gold paragraph alone, 7,500 other questions
#   with the gold paragraph and 2 distractors from the same article, and NQ_TRAIN twice, shuffled
#   (seed 34). Session 24 drew its mixture with this recipe; this script is its reproducible form.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 DATA_DIR NQ_TRAIN OUT.jsonl [REFRAG_BINARY]" >&2
  exit 2
fi
DATA=$(realpath -m "$1")
NQ=$(realpath -m "$2")
OUT=$(realpath -m "$3")
B=$(realpath -m "${4:-$(command -v refrag || echo target/release/refrag)}")
[ -f "$NQ" ] || { echo "$NQ: not found (scripts/qa_sets.sh makes it)" >&2; exit 2; }
[ -x "$B" ] || { echo "$B: no refrag binary (build it, or give its path)" >&2; exit 2; }
parts=("$DATA"/squad-train/train-v1.1-evalclean.part*.json.gz)
[ -f "${parts[0]}" ] || { echo "$DATA/squad-train: no train-v1.1-evalclean parts" >&2; exit 2; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for p in "${parts[@]}"; do
  n=$(basename "$p" .json.gz)
  gzip -dc "$p" > "$W/$n.json"
  "$B" -q dataset squad "$W/$n.json" --split all --tasks "$W/$n.gold.jsonl"
  "$B" -q dataset squad "$W/$n.json" --split all --distractors 2 --tasks "$W/$n.gold3.jsonl"
done
python3 - "$W" "$NQ" "$OUT" <<'EOF'
import glob, json, random, sys
work, nq, out = sys.argv[1:4]
def read(paths):
    return [json.loads(l) for p in sorted(paths) for l in open(p, encoding="utf-8") if l.strip()]
gold = {t["task_id"]: t for t in read(glob.glob(f"{work}/*.gold.jsonl"))}
gold3 = {t["task_id"]: t for t in read(glob.glob(f"{work}/*.gold3.jsonl"))}
ids = sorted(gold)
rng = random.Random(34)
rng.shuffle(ids)
tasks = [gold[i] for i in ids[:7500]] + [gold3[i] for i in ids[7500:15000] if i in gold3]
nq_tasks = read([nq])
tasks += nq_tasks + nq_tasks
rng.shuffle(tasks)
with open(out, "w", encoding="utf-8") as f:
    for t in tasks:
        f.write(json.dumps(t) + "\n")
print(f"{len(tasks)} tasks -> {out} (15,000 SQuAD train, {len(nq_tasks)} NQ train x 2)")
EOF
