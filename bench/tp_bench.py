"""Tensor-parallel step time: tp=N against tp=1, same machine, same checkpoint, same prompts, one run.

    python bench/engine.py --tp 2 [--model tiny|small] [--batches 1,8] [--prompt-len 128] [--gen-len 32]
                                  [--device cpu|cuda] [--json PATH]

For each configuration (tp=1 twice, then tp=N with the vocab-parallel lm_head, then tp=N with a
replicated lm_head) an engine is built, rank 0 in this process and ranks 1..N-1 in spawned
processes (engine/tp_worker.run_worker), exactly as a Decoder replica's workers run it, and
measured with bench/engine.py's `engine_decode`: the prefill of the batch (every row's first
token) and the steady decode step. On a CPU the cores are split evenly: each of the N ranks gets
a 1/N share of `--threads` (default: torch's count); tp=1 is measured twice, with all the threads
and with one rank's share. Ratios are against the second: what N ranks with a share each give
over one rank with that share (on a GPU machine: over one device). `small` is a ~0.2B random
Qwen2.5-VL text stack (hidden 1024, 8 layers) where the matmuls outweigh the all-reduces; `tiny`
is the test model. On a GPU machine each rank takes one device (cuda:rank).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlora.engine.config import EngineConfig  # noqa: E402
from vlora.engine.engine import LLMEngine  # noqa: E402
from vlora.engine.tiny import TinySpec, write_tiny_model  # noqa: E402
from vlora.engine.tp import TPSpec, free_port  # noqa: E402
from vlora.engine.tp_worker import run_worker  # noqa: E402

SMALL = TinySpec(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=4, mrope_section=(8, 12, 12),
                 init_std=0.02)


def _worker(config: EngineConfig, spec: TPSpec, threads: int) -> None:
    torch.set_num_threads(threads)
    if config.device.startswith("cuda"):
        torch.cuda.set_device(spec.rank)
        config.device = f"cuda:{spec.rank}"
    run_worker(config, spec)


def measure(model_dir: Path, tp: int, lm_head: str, args, engine_decode, threads: int | None = None) -> dict:
    threads = threads or max(1, args.threads // tp)
    torch.set_num_threads(threads)
    cfg = EngineConfig(str(model_dir), device=args.device, dtype=args.dtype, num_kv_blocks=2048,
                       max_num_seqs=max(args.batches),
                       max_num_batched_tokens=max(2048, max(args.batches) * args.prompt_len),
                       max_loras=0, enforce_eager=True)
    workers, spec = [], None
    if tp > 1:
        spec = TPSpec(rank=0, world_size=tp, master_port=free_port(), lm_head=lm_head)
        ctx = mp.get_context("spawn")
        for r in range(1, tp):
            w = ctx.Process(target=_worker, args=(cfg, spec.for_rank(r), threads), daemon=True)
            w.start()
            workers.append(w)
    engine = LLMEngine(cfg, tp=spec)
    gen = torch.Generator().manual_seed(0)
    vocab = 256  # byte-level BPE: ids below 256 are plain text tokens in every checkpoint this writes
    out = {"tp": tp, "lm_head": lm_head if tp > 1 else "-", "threads_per_rank": threads, "batches": []}
    for B in args.batches:
        prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(B)]
        engine_decode(engine, prompts, 3, args.device)  # warm-up
        runs = [engine_decode(engine, prompts, args.gen_len, args.device) for _ in range(args.repeats)]
        out["batches"].append({"batch": B,
                               "prefill_ms": statistics.median(r["ttft_all_ms"] for r in runs),
                               "decode_step_ms": statistics.median(r["decode_step_ms"] for r in runs)})
    if engine.tp is not None:
        engine.tp.stop()
    for w in workers:
        w.join(timeout=30)
    return out


def main(argv, engine_decode) -> dict:
    """`engine_decode`: bench/engine.py's measurement of one batch (passed in: that script is `__main__`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--model", choices=["tiny", "small"], default="small")
    p.add_argument("--model-dir", help="a checkpoint instead of --model")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json")
    a = p.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",")]
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    with tempfile.TemporaryDirectory(prefix="vlora-tp-bench-") as tmp:
        model_dir = Path(a.model_dir) if a.model_dir else write_tiny_model(
            Path(tmp) / a.model, seed=0, spec=SMALL if a.model == "small" else TinySpec())
        runs = [measure(model_dir, 1, "-", a, engine_decode),
                # the baseline of the ratios: tp=1 on one rank's share of the threads
                measure(model_dir, 1, "-", a, engine_decode, threads=max(1, a.threads // a.tp)),
                measure(model_dir, a.tp, "vocab_parallel", a, engine_decode),
                measure(model_dir, a.tp, "replicated", a, engine_decode)]
    base = {b["batch"]: b for b in runs[1]["batches"]}
    print(f"tensor-parallel step time, {a.device} ({platform.processor() or platform.machine()}), {a.threads} threads "
          f"in all; model {a.model_dir or a.model}; prompt {a.prompt_len}, {a.gen_len} generated, greedy; "
          f"median of {a.repeats}")
    print(f"{'tp':>3} {'lm_head':>15} {'threads/rank':>12} {'batch':>5} {'prefill ms':>11} {'vs tp=1':>8} "
          f"{'decode ms/step':>15} {'vs tp=1':>8}")
    for r in runs:
        for b in r["batches"]:
            b0 = base[b["batch"]]
            b["prefill_vs_tp1"] = b["prefill_ms"] / b0["prefill_ms"]
            b["decode_vs_tp1"] = b["decode_step_ms"] / b0["decode_step_ms"]
            print(f"{r['tp']:>3} {r['lm_head']:>15} {r['threads_per_rank']:>12} {b['batch']:>5} "
                  f"{b['prefill_ms']:>11.1f} {b['prefill_vs_tp1']:>7.2f}x {b['decode_step_ms']:>15.2f} "
                  f"{b['decode_vs_tp1']:>7.2f}x")
    result = {"meta": {"device": a.device, "threads": a.threads, "model": a.model_dir or a.model,
                       "prompt_len": a.prompt_len, "gen_len": a.gen_len, "repeats": a.repeats,
                       "torch": torch.__version__}, "runs": runs}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result
