"""Structured outputs: decode cost of a batch where half the rows are JSON-schema constrained, against
the same batch unconstrained, in one run on one engine.

    python bench/engine.py structured [--model-dir DIR | --arch-7b] [--batch 16] [--gen-len 64]
                                      [--repeats 3] [--json PATH]

Every row is greedy with the same prompt length and max_tokens. Constrained rows follow a nested
schema (an array of gen_len/8 objects with an enum and a bounded integer each), long enough that
no row finishes before max_tokens, so every measured step has the whole batch decoding. The figure
is the median decode step time over the window after every row has its first token (the best of
the repeats, since other load on a shared machine only adds time); tok/s = batch / step. The
mask work alone (fill, copy, masked fill for the constrained half) is timed apart. Per step the constrained rows pay the host-side bitmask fill (xgrammar, one matcher
per row), one host->device copy and one masked fill; unconstrained rows pay nothing.
NOTE: without a real checkpoint the tokenizer is the tiny one (about 1k tokens), so the host fill
walks a small vocabulary; with Qwen's 151k-token vocabulary the fill costs more per row.

    python bench/structured.py learn [--seed 0] [--checkpoints 50,60,70,80,90,100] [--json PATH]

Learning to call the right function (issue 16), in one process: `LoRATrainer` on the 8 tool-call
examples of tests/e2e/test_structured.py (rank 8, alpha 16, lr 1e-2), the adapter taken at each
checkpoint step and served by an `LLMEngine`; per held-out question under tools (tool_choice
"auto": free greedy text, parsed as the API does), the called function against the wanted one.
The same for the earlier example set whose time questions are longer than its weather questions,
and, per set, how many held-out answers stay the same when one or two "?" are appended to the
question (a model that reads the keyword does not care; one that reads the length flips).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vlora.engine.config import EngineConfig  # noqa: E402
from vlora.engine.engine import LLMEngine  # noqa: E402
from vlora.engine.grammar import GrammarSpec  # noqa: E402
from vlora.engine.sampling import SamplingParams  # noqa: E402


def schema(n_items: int) -> dict:
    return {"type": "object", "properties": {"items": {
        "type": "array", "minItems": n_items, "maxItems": n_items,
        "items": {"type": "object", "properties": {"kind": {"enum": ["alpha", "beta", "gamma"]},
                                                   "score": {"type": "integer", "minimum": 0, "maximum": 99}},
                  "required": ["kind", "score"]}}}, "required": ["items"]}


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def decode_steps(engine: LLMEngine, prompts: list[list[int]], samplings: list[SamplingParams], dev: str) -> dict:
    """Median step time while every row decodes (after all first tokens, before any row finishes)."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, samplings)]
    got = {r: 0 for r in rids}
    times: list[float] = []
    finished = False
    while engine.has_unfinished():
        sync(dev)
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        started_before = all(v > 0 for v in got.values())
        for o in outs:
            got[o.request_id] += sum(len(c.token_ids) for c in o.choices)
            finished = finished or o.finished
        if started_before and not finished:
            times.append(dt)
    return {"step_ms": statistics.median(times) * 1e3, "steps": len(times), "tokens": sum(got.values())}


def mask_cost_us(engine: LLMEngine, spec: GrammarSpec, B: int, dev: str, iters: int = 200) -> float:
    """Host fill + copy + masked fill for B/2 constrained rows of a B-row batch, per step (microseconds)."""
    from vlora.engine.sampling import RowState, apply_grammar_masks

    rows = [RowState.create(SamplingParams()) for _ in range(B)]
    compiled = engine.grammars.get(spec)
    for r in rows[1::2]:
        r.grammar = engine.grammars.new_matcher(compiled)
    logits = torch.randn(B, engine.model.cfg.vocab_size, device=dev)
    apply_grammar_masks(logits, rows)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        apply_grammar_masks(logits, rows)
    sync(dev)
    return (time.perf_counter() - t0) / iters * 1e6


# The example set the e2e test used before: written freely, so its time questions ("time" is four
# tokens of the tiny vocabulary, " weather" one) are 1-3 tokens longer than its weather questions.
UNBALANCED_TRAIN = [("What is the weather in Paris?", "get_weather"), ("Weather in Oslo please", "get_weather"),
                    ("Is it raining in Lima? weather", "get_weather"), ("weather report for Cairo", "get_weather"),
                    ("What time is it in Paris?", "get_time"), ("Current time in Oslo please", "get_time"),
                    ("time now in Lima?", "get_time"), ("Tell me the time in Cairo", "get_time")]


def learn(argv=None) -> dict:
    """Right-function agreement on held-out questions before and after learning on tool calls."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the generated tiny model")
    p.add_argument("--checkpoints", default="50,60,70,80,90,100")
    p.add_argument("--json")
    a = p.parse_args(argv)
    from tests.e2e.test_structured import CLOCK_TOOLS, HELD_OUT, TRAIN, _tool_example
    from vlora.adapters.trainer import _MODULE_PARENT, LoRATrainer
    from vlora.engine.lora import LoRAWeights
    from vlora.engine.tiny import write_tiny_model
    from vlora.engine.tools import parse_tool_calls

    checkpoints = [int(x) for x in a.checkpoints.split(",")]
    model_dir = write_tiny_model(Path(tempfile.mkdtemp(prefix="vlora-bench-learn-")) / "tiny", seed=a.seed)
    trainer = LoRATrainer(model_dir)
    engine = LLMEngine(EngineConfig(str(model_dir), block_size=4, num_kv_blocks=4096, max_loras=1, max_lora_rank=8))
    greedy = SamplingParams(max_tokens=60, temperature=0)

    def called(adapter, questions):
        prompts = [trainer.builder.build_chat([{"role": "user", "content": q}], [], True, CLOCK_TOOLS)
                   for q in questions]
        names = []
        for out in engine.generate(prompts, greedy, adapters=[adapter] * len(prompts)):
            _, calls = parse_tool_calls(engine.tokenizer.decode(out[0], skip_special_tokens=True))
            names.append(calls[0].name if len(calls) == 1 else None)
        return names

    def agree(names, pairs):
        return sum(n == want for n, (_, want) in zip(names, pairs))

    out = {"model": f"tiny (engine.tiny, seed {a.seed})", "device": "cpu", "rank": 8, "lora_alpha": 16,
           "learning_rate": 1e-2, "sets": {}}
    for label, train_set in (("length-balanced (the e2e test's)", TRAIN), ("unbalanced (before)", UNBALANCED_TRAIN)):
        snaps: dict[int, tuple[LoRAWeights, float]] = {}

        def snapshot(step, loss):
            if step in checkpoints:  # the live PEFT layers, read as the job's end reads them
                layers = {(i, mod): getattr(getattr(layer, parent), mod)
                          for i, layer in enumerate(trainer.model.model.language_model.layers)
                          for mod, parent in _MODULE_PARENT.items()}
                snaps[step] = (LoRATrainer._extract(layers, 8), loss)

        t0 = time.perf_counter()
        result = trainer.train([_tool_example(q, n) for q, n in train_set], steps=max(checkpoints),
                               learning_rate=1e-2, rank=8, lora_alpha=16, progress=snapshot)
        rows = [{"step": 0, "loss": result.loss_before, "train": agree(called(None, [q for q, _ in train_set]),
                                                                      train_set),
                 "held_out": agree(called(None, [q for q, _ in HELD_OUT]), HELD_OUT)}]
        for step in checkpoints:
            weights, loss = snaps[step]
            engine.add_lora("probe", weights, version=step)
            held = called("probe", [q for q, _ in HELD_OUT])
            row = {"step": step, "loss": loss, "train": agree(called("probe", [q for q, _ in train_set]), train_set),
                   "held_out": agree(held, HELD_OUT), "well_formed": sum(n is not None for n in held)}
            padded = [called("probe", [q + "?" * k for q, _ in HELD_OUT]) for k in (1, 2)]
            row["same_with_?_appended"] = sum(x == y for p in padded for x, y in zip(p, held))
            rows.append(row)
            engine.remove_lora("probe")
        out["sets"][label] = {"seconds": time.perf_counter() - t0, "rows": rows}
        print(label, f"(held-out {len(HELD_OUT)}, train {len(train_set)})")
        for row in rows:
            print("  ", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


def main(argv=None, build_7b=None) -> dict:
    """`build_7b(tmp_dir, device) -> checkpoint dir` comes from bench/engine.py (the --arch-7b builder)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["learn"]:
        return learn(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir")
    p.add_argument("--arch-7b", action="store_true", help="Qwen2.5-VL-7B architecture, random bf16 weights (GPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if dev.startswith("cuda") else "float32"
    tmp = Path(tempfile.mkdtemp(prefix="vlora-bench-structured-"))
    if a.arch_7b:
        if build_7b is None:
            p.error("--arch-7b: run it as `python bench/engine.py structured --arch-7b` (it builds the checkpoint)")
        model_dir, label = build_7b(tmp, dev), "Qwen2.5-VL-7B architecture, random weights"
    elif a.model_dir:
        model_dir, label = Path(a.model_dir), a.model_dir
    else:
        from vlora.engine.tiny import write_tiny_model

        model_dir, label = write_tiny_model(tmp / "tiny", seed=0), "tiny (engine.tiny, generated)"
    B, G = a.batch, a.gen_len
    cfg = EngineConfig(str(model_dir), device=dev, dtype=dtype, max_num_seqs=B, max_loras=0,
                       num_kv_blocks=B * ((a.prompt_len + G) // 16 + 2) + 8)
    engine = LLMEngine(cfg)
    gen = torch.Generator().manual_seed(0)
    hi = min(engine.tokenizer.vocab_size, engine.model.cfg.vocab_size) - 1
    prompts = [torch.randint(0, hi, (a.prompt_len,), generator=gen).tolist() for _ in range(B)]
    spec = GrammarSpec.json_schema(schema(max(2, G // 8)))
    engine.grammars.get(spec)  # compiled before timing, as the serving path does before admission
    free = SamplingParams(max_tokens=G, temperature=0, ignore_eos=True)
    bound = SamplingParams(max_tokens=G, temperature=0, grammar=spec)
    cases = {"unconstrained": [free] * B,
             "half_constrained": [bound if i % 2 else free for i in range(B)],
             "all_constrained": [bound] * B}
    decode_steps(engine, prompts, cases["half_constrained"], dev)  # warm-up (graphs, allocator, caches)
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    for _ in range(a.repeats):
        for name, sps in cases.items():
            runs[name].append(decode_steps(engine, prompts, sps, dev))
    # best of the repeats: on a shared machine other load only ever adds time
    step = {k: min(r["step_ms"] for r in v) for k, v in runs.items()}
    mask_us = mask_cost_us(engine, spec, B, dev)
    out = {
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
        "model": label, "batch": B, "prompt_len": a.prompt_len, "gen_len": G, "repeats": a.repeats,
        "steps_measured": {k: v[0]["steps"] for k, v in runs.items()},
        "step_ms": step,
        "tok_s": {k: B / (v / 1e3) for k, v in step.items()},
        "half_vs_unconstrained": step["unconstrained"] / step["half_constrained"],
        "mask_us_per_step_half_batch": mask_us,
        "all_vs_unconstrained": step["unconstrained"] / step["all_constrained"],
    }
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
