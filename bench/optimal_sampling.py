"""Cost of optimal sampling vs plain sampling in the engine (decode tok/s, same run).

Optimal sampling adds a teacher row per sequence (same base model, another adapter or none) and
an alpha solve per token, so the expected cost is about one extra batch row plus the solver.
Prints, per batch size: plain sampling with the student adapter, optimal sampling with the base
model as teacher, and with another adapter as teacher, each for `kl_symmetry` (iterative alpha)
and `entropy` (closed form), with ratios against plain.

    python bench/optimal_sampling.py [--model-dir DIR] [--batches 1,16] [--gen-len 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402

from bench.engine import device_name, engine_decode, median  # noqa: E402
from vlora.engine.config import EngineConfig  # noqa: E402
from vlora.engine.engine import LLMEngine  # noqa: E402
from vlora.engine.lora import LoRAWeights  # noqa: E402
from vlora.engine.optimal_sampling import OptimalSamplingParams  # noqa: E402
from vlora.engine.sampling import SamplingParams  # noqa: E402
from vlora.engine.tiny import write_tiny_model  # noqa: E402


def random_lora(engine: LLMEngine, rank: int, seed: int) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    shapes = engine.model.cfg.lora_module_shapes(engine.config.lora_target_modules)
    weights = {k: (torch.randn(rank, i, generator=g) * 0.05, torch.randn(o, rank, generator=g) * 0.05)
               for k, (i, o) in shapes.items()}
    return LoRAWeights(rank=rank, scaling=2.0, weights=weights)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared 2-core box)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model_dir or str(write_tiny_model(Path(tmp.name) / "tiny"))
    engine = LLMEngine(EngineConfig(model_dir, num_kv_blocks=4096, max_num_seqs=128, max_loras=2, max_lora_rank=16))
    engine.add_lora("student", random_lora(engine, 16, 1))
    engine.add_lora("teacher", random_lora(engine, 16, 2))
    g = torch.Generator().manual_seed(0)
    limit = len(engine.tokenizer) - 20
    sp = SamplingParams(max_tokens=args.gen_len, temperature=1.0, top_p=0.95, seed=0, ignore_eos=True)
    modes = {
        "plain (student)": {},
        "optimal, teacher base, kl_symmetry": {"optimal": OptimalSamplingParams(teacher="base")},
        "optimal, teacher base, entropy": {"optimal": OptimalSamplingParams(teacher="base", alpha_method="entropy")},
        "optimal, teacher adapter, kl_symmetry": {"optimal": OptimalSamplingParams(teacher="teacher")},
    }
    print(f"vlora optimal-sampling cost (bench/optimal_sampling.py)\ndevice: {device_name('cpu')}, torch "
          f"{torch.__version__} ({args.threads} threads); prompt {args.prompt_len}, {args.gen_len} generated, "
          f"temperature 1.0, top_p 0.95; median of {args.repeats} runs, modes interleaved\n")
    results = {}
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [torch.randint(0, limit, (args.prompt_len,), generator=g).tolist() for _ in range(B)]
        runs = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode, kw in modes.items():
                runs[mode].append(engine_decode(engine, prompts, args.gen_len, "cpu", ["student"] * B, sp,
                                                **kw)["decode_tok_s"])
        results[B] = {m: median(v) for m, v in runs.items()}
        base = results[B]["plain (student)"]
        print(f"batch {B}")
        for mode, tok_s in results[B].items():
            print(f"  {mode:40s} {tok_s:9.1f} tok/s   {tok_s / base:5.2f}x of plain")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name("cpu"), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
