#!/usr/bin/env bash
# One prepared GPU check: every method of benchmarks/bench_sampling.py (Flow-GRPO, Flow-GRPO-Fast, MixGRPO,
# MixGRPO-Flash, MixGRPO-Flash*) for one timed iteration (after one warm-up), without and with gradient checkpointing,
# on three random-weight pipelines: SD3.5-Medium-sized (`--transformer sd35m`: the 2.24B-parameter transformer, 512 px,
# CFG), FLUX.1-wide with 5 + 10 blocks and Qwen-Image-wide with 8 blocks (`flux`, `qwen_image`: 3072 wide, 1024 image
# tokens; see bench_sampling.family_sized_pipeline). T = 8, 4 images per iteration, LoRA. Reports per method: time,
# peak memory, model TFLOPs, TFLOP/s and MFU for the rollout and the training. Writes <out>/gpu_check.json (every
# run) and <out>/gpu_check.md (their tables), plus one run_<family>_<knobs>.{json,md} per run. Meant to fit in about
# 8 minutes on one H100 / H200 (not yet run on one: no GPU where it was written).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU; results in benchmarks/results/gpu_check/
#   bash benchmarks/gpu_check.sh --device cpu --tiny  # dry run of the same steps on CPU (the test's)
#
# Options: --device cuda|cpu (default cuda), --tiny (tiny models: SD3's 2-layer test pipeline, FLUX / Qwen-Image with
# 1 layer of one head, 32 px, T=4, one thread), --out DIR, --peak-tflops X (MFU against X instead of
# bench_sampling.PEAK_TFLOPS), --methods "fast flash", --families "sd35m flux qwen_image", --knobs
# "none gradient_checkpointing" (subsets). Every family runs its methods in one process (--in-process). Set PYTHON
# to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
DEVICE=cuda
TINY=0
OUT=benchmarks/results/gpu_check
PEAK=()
METHODS=()
FAMILIES="sd35m flux qwen_image"
KNOBS="none gradient_checkpointing"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --peak-tflops) PEAK=(--peak-tflops "$2"); shift 2 ;;
    --methods) METHODS=(--methods $2); shift 2 ;;  # a quoted, space-separated subset of bench_sampling's
    --families) FAMILIES="$2"; shift 2 ;;
    --knobs) KNOBS="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
# Per family: the bench_sampling options of the GPU run and of the dry run (--tiny).
declare -A SIZED=(
  [sd35m]="--transformer sd35m --resolution 512 --cfg"
  [flux]="--transformer flux --num-layers 5 --resolution 128"
  [qwen_image]="--transformer qwen_image --num-layers 8 --resolution 128"
)
declare -A TINY_SIZED=(
  [sd35m]="--transformer tiny --resolution 32"
  [flux]="--transformer flux --num-layers 1 --num-heads 1 --resolution 32"
  [qwen_image]="--transformer qwen_image --num-layers 1 --num-heads 1 --resolution 32"
)
if [[ "$TINY" == 1 ]]; then
  COMMON=(--steps 4 --window-size 2 --fast-window-size 1 --num-generations 2 --batch-size 2 --threads 1)
else
  COMMON=(--steps 8 --window-size 3 --num-generations 4 --batch-size 4)
fi
mkdir -p "$OUT"
for family in $FAMILIES; do
  if [[ "$TINY" == 1 ]]; then read -r -a MODEL <<< "${TINY_SIZED[$family]}"; else read -r -a MODEL <<< "${SIZED[$family]}"; fi
  for knob in $KNOBS; do
    EXTRA=()
    [[ "$knob" == gradient_checkpointing ]] && EXTRA=(--gradient-checkpointing)
    echo "== $family, knobs: $knob" >&2
    "$PYTHON" benchmarks/bench_sampling.py "${MODEL[@]}" "${COMMON[@]}" "${EXTRA[@]}" "${PEAK[@]}" "${METHODS[@]}" \
      --accumulation 1 --iterations 1 --in-process --device "$DEVICE" --json "$OUT/run_${family}_$knob.json" \
      | tee "$OUT/run_${family}_$knob.md"
  done
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
names = sorted(p.stem[len("run_") :] for p in out.glob("run_*.json"))
runs = {name: json.loads((out / f"run_{name}.json").read_text()) for name in names}
(out / "gpu_check.json").write_text(json.dumps(runs, indent=2))
tables = [f"## {name}\n\n" + (out / f"run_{name}.md").read_text() for name in names]
(out / "gpu_check.md").write_text("\n".join(tables))
print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
PY
