#!/usr/bin/env bash
# One prepared GPU check: every method of benchmarks/bench_sampling.py (Flow-GRPO, Flow-GRPO-Fast, MixGRPO,
# MixGRPO-Flash, MixGRPO-Flash*) for one timed iteration (after one warm-up) on a random-weight pipeline the size of
# SD3.5-Medium (`--transformer sd35m`: 2.24B-parameter transformer, 512 px, CFG, T=10), without and with gradient
# checkpointing. Reports per method: time, peak memory, model TFLOPs, TFLOP/s and MFU for the rollout and the training.
# Writes <out>/gpu_check.json (both runs) and <out>/gpu_check.md (their tables). About 5 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU; results in benchmarks/results/gpu_check/
#   bash benchmarks/gpu_check.sh --device cpu --tiny  # dry run of the same steps on CPU in seconds (the test's)
#
# Options: --device cuda|cpu (default cuda), --tiny (the tiny 2-layer pipeline, 32 px, T=4, one thread),
# --out DIR, --peak-tflops X (MFU against X instead of bench_sampling.PEAK_TFLOPS), --methods "fast flash" (a
# subset). Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
DEVICE=cuda
TINY=0
OUT=benchmarks/results/gpu_check
PEAK=()
METHODS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --peak-tflops) PEAK=(--peak-tflops "$2"); shift 2 ;;
    --methods) METHODS=(--methods $2); shift 2 ;;  # a quoted, space-separated subset of bench_sampling's
    *) echo "gpu_check.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [[ "$TINY" == 1 ]]; then
  COMMON=(--transformer tiny --resolution 32 --steps 4 --window-size 2 --fast-window-size 1 --num-generations 2
          --batch-size 2 --accumulation 1 --threads 1 --in-process)
else
  COMMON=(--transformer sd35m --resolution 512 --steps 10 --window-size 4 --num-generations 4 --batch-size 4
          --accumulation 1 --cfg)
fi
mkdir -p "$OUT"
for knob in none gradient_checkpointing; do
  EXTRA=()
  [[ "$knob" == gradient_checkpointing ]] && EXTRA=(--gradient-checkpointing)
  echo "== $knob" >&2
  "$PYTHON" benchmarks/bench_sampling.py "${COMMON[@]}" "${EXTRA[@]}" "${PEAK[@]}" "${METHODS[@]}" --iterations 1 --device "$DEVICE" \
    --json "$OUT/run_$knob.json" | tee "$OUT/run_$knob.md"
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {knob: json.loads((out / f"run_{knob}.json").read_text()) for knob in ("none", "gradient_checkpointing")}
(out / "gpu_check.json").write_text(json.dumps(runs, indent=2))
tables = [f"## knobs: {knob}\n\n" + (out / f"run_{knob}.md").read_text() for knob in runs]
(out / "gpu_check.md").write_text("\n".join(tables))
print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
PY
