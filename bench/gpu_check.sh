#!/usr/bin/env bash
# The whole GPU check in one command (see ../shared/gpu/README.md), results under $OUT
# (default bench/results/gpu_check/):
#   1. engine vs HF/HF+PEFT parity in bf16 (bench/gpu_parity.py; tolerances stated there and in its JSON)
#   2. bench/engine.py --arch-7b with CUDA graphs on (HF/PEFT baseline in the same run) and off
#      (--enforce-eager): decode batch 1/16/64, 8-adapter mixed batch, image TTFT
#   3. bench/hotpath.py on the GPU: arrival step, aten ops per decode step, sampler
#   4. bench/vision.py --arch 7b: our vision tower vs HF's, and the embedding transfer
# Without CUDA it is a dry run: the same scripts in float32 on the CPU with small sizes, and the
# CUDA-only parts reported as skipped. Exit status: 0 if every step that ran passed.
#   bash bench/gpu_check.sh            # on the GPU machine: run from the project root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT_DIR"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d /tmp/site ]; then export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}"; else export PYTHONPATH="$PWD:${PYTHONPATH:-}"; fi
export PYTHONUNBUFFERED=1
status=0

run() {  # run NAME TIMEOUT_S CMD...: log to $OUT_DIR/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

"$PY" - >"$OUT_DIR/env.txt" 2>&1 <<'PYEOF'
import platform, torch, transformers
try:
    import peft; pv = peft.__version__
except Exception as e:  # noqa: BLE001
    pv = f"missing ({e})"
cuda = torch.cuda.is_available()
print("device:", torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", pv)
try:
    import flash_attn; print("flash_attn", flash_attn.__version__)
except Exception:
    print("flash_attn not installed (pure-torch attention paths)")
PYEOF
cat "$OUT_DIR/env.txt"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  run parity_bf16 300 "$PY" bench/gpu_parity.py --device cuda --dtype bfloat16 --json "$OUT_DIR/parity_bf16.json"
  run engine_7b_graphs 420 "$PY" bench/engine.py --arch-7b --repeats 2 --json "$OUT_DIR/engine_7b_graphs.json"
  run engine_7b_eager 300 "$PY" bench/engine.py --arch-7b --repeats 2 --enforce-eager --no-hf \
    --json "$OUT_DIR/engine_7b_eager.json"
  run hotpath_cuda 180 "$PY" bench/hotpath.py --device cuda --no-baseline --json "$OUT_DIR/hotpath_cuda.json"
  run vision_7b 300 "$PY" bench/vision.py --arch 7b --repeats 5 --transfer --json "$OUT_DIR/vision_7b.json"
else
  echo "no CUDA device: dry run on the CPU (float32, small sizes)"
  run parity_fp32_cpu 600 "$PY" bench/gpu_parity.py --device cpu --dtype float32 --tokens 8 \
    --json "$OUT_DIR/parity_fp32_cpu.json"
  run engine_quick_cpu 600 "$PY" bench/engine.py --quick --no-hf --threads 1 --json "$OUT_DIR/engine_quick_cpu.json"
  run engine_quick_cpu_eager 600 "$PY" bench/engine.py --quick --no-hf --threads 1 --enforce-eager \
    --json "$OUT_DIR/engine_quick_cpu_eager.json"
  run vision_quick_cpu 300 "$PY" bench/vision.py --cases 448 --repeats 1 --json "$OUT_DIR/vision_quick_cpu.json"
  echo "skipped (needs CUDA): parity in bf16, bench/engine.py --arch-7b with graphs on/off, hotpath on the GPU"
fi
echo "results in $OUT_DIR; overall exit $status"
exit $status
