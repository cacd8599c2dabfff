#!/usr/bin/env bash
# On one GPU: the 1b preset as one SPES node (4 of 16 experts) and as one full-training node,
# a few dozen steps each, printing tokens/s and peak GPU memory. Finishes in a few minutes on an H100.
#   scripts/gpu_check.sh [steps] [batch] [seq]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${1:-30}; BATCH=${2:-4}; SEQ=${3:-2048}
OUT=${OUT:-.}
for mode in spes full; do
  timeout 300 "$PY" scripts/gpu_check.py --preset 1b --mode "$mode" --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" \
    | tee -a "$OUT/gpu_check.jsonl"
done
"$PY" - "$OUT/gpu_check.jsonl" <<'PYEOF'
import json, sys
rows = {r["mode"]: r for r in map(json.loads, open(sys.argv[1]))}
s, f = rows["spes"], rows["full"]
print(f"{s['device']}: 1b SPES node {s['tokens_per_s']:.0f} tok/s, {s['peak_mem_gb']:.1f} GB | "
      f"full node {f['tokens_per_s']:.0f} tok/s, {f['peak_mem_gb']:.1f} GB | "
      f"memory ratio {s['peak_mem_gb'] / f['peak_mem_gb']:.3f}, throughput ratio {s['tokens_per_s'] / f['tokens_per_s']:.3f}")
PYEOF
