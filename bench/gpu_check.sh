#!/usr/bin/env bash
# The whole GPU check in one command (see ../shared/gpu/README.md), results under $OUT
# (default bench/results/gpu_check/). Steps, in the order they run (the most wanted first):
#   parity_bf16       engine vs HF/HF+PEFT parity in bf16 (bench/gpu_parity.py; tolerances stated there and in its JSON)
#   engine_7b_graphs  bench/engine.py --arch-7b with CUDA graphs on (HF/PEFT baseline in the same run):
#                     decode batch 1/16/64, 8-adapter mixed batch, image TTFT
#   serve_path        bench/serve.py path on this host (issue 10): vlora through HTTP against the floor, the
#                     floor with vlora's engine, and the engine alone, the engine on the GPU and the path on
#                     the host's own cores; needs Ray Serve (the carried bundle below)
#   hotpath_cuda      bench/hotpath.py on the GPU: arrival step, aten ops per decode step, sampler
#   vision_7b         bench/vision.py --arch 7b: our vision tower vs HF's, and the embedding transfer
#   engine_7b_eager   bench/engine.py --arch-7b --enforce-eager (graphs off, no HF)
# Without CUDA it is a dry run: the same scripts in float32 on the CPU with small sizes, and the
# CUDA-only parts reported as skipped.
#
# Time: the steps share BUDGET_S seconds (default 540 with CUDA, so one device call of 600 s holds the
# run; 1800 for the dry run);
# each step gets the smaller of its own limit and what is left, and a step with under 30 s left is
# skipped and named. STEPS="a b" runs only those steps (a rerun of what the budget cut off).
# Ray Serve: the GPU machine has none. Build the bundle here once (bash ../shared/gpu/make-ray-bundle.sh,
# git-ignored .gpu/), carry ".gpu" with the run, and this script unpacks it into /tmp/site.
# Exit status: 0 if every step that ran passed.
#   bash bench/gpu_check.sh            # on the GPU machine: run from the project root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT_DIR"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
BUNDLE=.gpu/ray-serve-site-cp312.tar.xz
if ! "$PY" -c "import ray.serve" 2>/dev/null && [ -f "$BUNDLE" ] && [ ! -d /tmp/site/ray ]; then
  mkdir -p /tmp/site && tar -xJf "$BUNDLE" -C /tmp/site && echo "unpacked $BUNDLE into /tmp/site"
fi
if [ -d /tmp/site ]; then export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"; else export PYTHONPATH="$PWD:${PYTHONPATH:-}"; fi
export PYTHONUNBUFFERED=1
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then HAVE_CUDA=1; else HAVE_CUDA=0; fi
if [ "$HAVE_CUDA" = 1 ]; then BUDGET_S="${BUDGET_S:-540}"; else BUDGET_S="${BUDGET_S:-1800}"; fi
STEPS="${STEPS:-}"
status=0
skipped=()

run() {  # run NAME TIMEOUT_S CMD...: log to $OUT_DIR/NAME.log, print its tail; within STEPS and the budget
  local name=$1 limit=$2; shift 2
  if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt 30 ]; then skipped+=("$name"); echo "== $name: skipped, ${left} s of the budget left"; return; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

"$PY" - >"$OUT_DIR/env.txt" 2>&1 <<'PYEOF'
import os, platform, torch, transformers
try:
    import peft; pv = peft.__version__
except Exception as e:  # noqa: BLE001
    pv = f"missing ({e})"
cuda = torch.cuda.is_available()
print("device:", torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine())
print("cpus:", os.cpu_count())
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", pv)
try:
    import flash_attn; print("flash_attn", flash_attn.__version__)
except Exception:
    print("flash_attn not installed (pure-torch attention paths)")
try:
    import ray; print("ray", ray.__version__)
except Exception:
    print("ray not importable (serve_path needs the carried bundle)")
PYEOF
cat "$OUT_DIR/env.txt"
serve_path() {  # serve_path NAME TIMEOUT_S LEVELS TOKENS: the serving-path bench, where Ray Serve imports
  if ! "$PY" -c "import ray.serve, fastapi, httpx" 2>/dev/null; then
    skipped+=("$1 (no Ray Serve: build and carry $BUNDLE)"); return
  fi
  run "$1" "$2" "$PY" bench/serve.py path --quick --before '' --levels "$3" --tokens "$4" --json "$OUT_DIR/$1.json"
}

if [ "$HAVE_CUDA" = 1 ]; then
  run parity_bf16 240 "$PY" bench/gpu_parity.py --device cuda --dtype bfloat16 --json "$OUT_DIR/parity_bf16.json"
  run engine_7b_graphs 300 "$PY" bench/engine.py --arch-7b --repeats 2 --json "$OUT_DIR/engine_7b_graphs.json"
  serve_path serve_path 240 1,16,64 64,256
  run hotpath_cuda 150 "$PY" bench/hotpath.py --device cuda --no-baseline --json "$OUT_DIR/hotpath_cuda.json"
  run vision_7b 240 "$PY" bench/vision.py --arch 7b --repeats 5 --transfer --json "$OUT_DIR/vision_7b.json"
  run engine_7b_eager 240 "$PY" bench/engine.py --arch-7b --repeats 2 --enforce-eager --no-hf \
    --json "$OUT_DIR/engine_7b_eager.json"
else
  echo "no CUDA device: dry run on the CPU (float32, small sizes)"
  run parity_fp32_cpu 600 "$PY" bench/gpu_parity.py --device cpu --dtype float32 --tokens 8 \
    --json "$OUT_DIR/parity_fp32_cpu.json"
  run engine_quick_cpu 600 "$PY" bench/engine.py --quick --no-hf --threads 1 --json "$OUT_DIR/engine_quick_cpu.json"
  serve_path serve_path_cpu 600 1,16 64
  run engine_quick_cpu_eager 600 "$PY" bench/engine.py --quick --no-hf --threads 1 --enforce-eager \
    --json "$OUT_DIR/engine_quick_cpu_eager.json"
  run vision_quick_cpu 300 "$PY" bench/vision.py --cases 448 --repeats 1 --json "$OUT_DIR/vision_quick_cpu.json"
  skipped+=("parity_bf16, engine_7b_graphs, serve_path, hotpath_cuda, vision_7b, engine_7b_eager (need CUDA)")
fi
for s in "${skipped[@]}"; do echo "skipped: $s"; done
echo "results in $OUT_DIR after ${SECONDS} s; overall exit $status"
exit $status
