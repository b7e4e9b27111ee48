"""Engine hot-path benchmark: the three numbers of issue 11, for this tree and a baseline tree in one run.

    python bench/hotpath.py [--baseline-ref main] [--threads 1] [--json PATH]

- arrival: a 1,900-token prompt arriving while 63 rows decode; that step's time over
  (a lone prefill of the same prompt + one 63-row decode step). Medians of `--repeats` runs.
- aten ops per decode step (batch 16, tiny model, 4 layers): every op a `TorchDispatchMode`
  sees during one `engine.step()`, base rows only and with 8 adapters in the batch; the target
  is 20 per layer + 80. "kernel ops" leaves out views and other metadata-only ops.
- sampler: `Sampler.sample` at vocab 152,064, batch 64: temperature 1 (unseeded) over greedy.

The baseline is `git archive <ref> engine` unpacked into a temp dir and measured in a subprocess
with the same arguments (one machine, one run). Imports only engine/ and torch, so it runs on
the GPU machine too (`--device cuda`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE_ROOT = Path(os.environ.get("VLORA_ENGINE_ROOT", REPO))
sys.path.insert(0, str(ENGINE_ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

VIEW_OPS = {"aten.view", "aten.slice", "aten.select", "aten.transpose", "aten.unsqueeze", "aten.squeeze",
            "aten.expand", "aten.reshape", "aten.flatten", "aten.alias", "aten.split", "aten.split_with_sizes",
            "aten.chunk", "aten.unbind", "aten.t", "aten.permute", "aten.as_strided", "aten.lift_fresh",
            "aten.unflatten", "aten.view_as", "aten.detach", "aten._unsafe_view"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, dev: str) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def make_engine(model_dir, dev: str, max_loras: int = 0, **kw):
    from vlora.engine.config import EngineConfig
    from vlora.engine.engine import LLMEngine

    cfg = dict(device=dev, num_kv_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048, max_loras=max_loras,
               max_lora_rank=8)
    return LLMEngine(EngineConfig(str(model_dir), **{**cfg, **kw}))


def arrival(model_dir, dev: str, repeats: int) -> dict:
    from vlora.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(0)
    eng = make_engine(model_dir, dev)
    long = torch.randint(10, 900, (1900,), generator=g).tolist()
    sp = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    runs = []
    for _ in range(repeats):
        rids = [eng.add_request(torch.randint(10, 900, (16,), generator=g).tolist(), sp) for _ in range(63)]
        eng.step()  # their prefill
        eng.step()
        decode = statistics.median(timed(eng.step, dev) for _ in range(3))
        rid = eng.add_request(long, sp)
        arrive = timed(eng.step, dev)
        for r in rids + [rid]:
            eng.abort(r)
        rid = eng.add_request(long, one)
        lone = timed(eng.step, dev)
        while eng.has_unfinished():
            eng.step()
        runs.append(dict(arrival_s=arrive, lone_prefill_s=lone, decode_step_s=decode,
                         ratio=arrive / (lone + decode)))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return dict(median=med, runs=runs)


def op_counts(model_dir, dev: str) -> dict:
    from vlora.engine.lora import LoRAWeights
    from vlora.engine.sampling import SamplingParams

    eng = make_engine(model_dir, dev, max_loras=8, max_num_seqs=16)
    cfg = eng.model.cfg
    g = torch.Generator().manual_seed(1)
    shapes = cfg.lora_module_shapes(eng.config.lora_target_modules)
    for i in range(8):
        w = {k: (torch.randn(8, fi, generator=g) * 0.05, torch.randn(fo, 8, generator=g) * 0.05)
             for k, (fi, fo) in shapes.items()}
        eng.add_lora(f"a{i}", LoRAWeights(8, 2.0, w))
    out = {"layers": cfg.num_layers, "target": 20 * cfg.num_layers + 80}
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for label, adapters in (("base", [None] * 16), ("8_adapters", [f"a{i % 8}" for i in range(16)])):
        for i, a in enumerate(adapters):
            eng.add_request([100 + i, 101, 102, 103], sp, a)
        eng.step()
        eng.step()
        counter = OpCounter()
        with counter:
            eng.step()
        while eng.has_unfinished():
            eng.step()
        total = sum(counter.ops.values())
        kernels = sum(n for op, n in counter.ops.items() if op not in VIEW_OPS)
        out[label] = dict(all_ops=total, kernel_ops=kernels, top=counter.ops.most_common(12))
    return out


def sampler(dev: str, repeats: int) -> dict:
    from vlora.engine.sampling import RowState, Sampler, SamplingParams

    V, B = 152064, 64
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(2)).to(dev)
    s = Sampler()
    res = {}
    for label, params in (("greedy", SamplingParams(temperature=0)), ("temperature_1", SamplingParams(temperature=1.0)),
                          ("temperature_1_seeded", SamplingParams(temperature=1.0, seed=5))):
        rows = [RowState.create(params, i) for i in range(B)]
        s.sample(logits, rows)  # warm-up
        res[label + "_ms"] = statistics.median(timed(lambda: s.sample(logits, rows), dev) for _ in range(repeats)) * 1e3
    res["ratio"] = res["temperature_1_ms"] / res["greedy_ms"]
    res["ratio_seeded"] = res["temperature_1_seeded_ms"] / res["greedy_ms"]
    return res


def measure(args) -> dict:
    from vlora.engine.tiny import write_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "tiny", seed=0)
        return dict(arrival=arrival(model_dir, args.device, args.repeats), ops=op_counts(model_dir, args.device),
                    sampler=sampler(args.device, max(5, args.repeats)))


def baseline(args) -> dict:
    """The same measurement on `args.baseline_ref`'s engine/, in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        data = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_ref, "engine"], check=True,
                              capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(data)).extractall(tmp)
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--no-baseline", "--json", str(out), "--device", args.device,
               "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
        subprocess.run(cmd, check=True, env={**os.environ, "VLORA_ENGINE_ROOT": tmp})
        return json.loads(out.read_text())["this"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable on a shared CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-ref", default="main", help="git ref whose engine/ is the baseline")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    res = {"engine_root": str(ENGINE_ROOT), "device": args.device, "threads": args.threads, "torch": torch.__version__}
    res["this"] = measure(args)
    if not args.no_baseline:
        res["baseline_ref"] = args.baseline_ref
        res["baseline"] = baseline(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    if not args.no_baseline:
        report(res)
    return res


def report(res: dict) -> None:
    t, b = res["this"], res["baseline"]
    print(f"engine hot path, {res['device']}, {res['threads']} torch thread(s); baseline = {res['baseline_ref']}")
    for name, r in (("this", t), ("baseline", b)):
        a = r["arrival"]["median"]
        print(f"  {name:9} arrival step {a['arrival_s'] * 1e3:8.1f} ms  lone prefill {a['lone_prefill_s'] * 1e3:7.1f} ms"
              f"  decode step {a['decode_step_s'] * 1e3:6.1f} ms  ratio {a['ratio']:6.2f}x (target <= 1.5x)")
    for name, r in (("this", t), ("baseline", b)):
        o = r["ops"]
        print(f"  {name:9} aten ops/decode step (B=16, {o['layers']} layers; target {o['target']}): base "
              f"{o['base']['all_ops']} ({o['base']['kernel_ops']} kernel ops), 8 adapters {o['8_adapters']['all_ops']} "
              f"({o['8_adapters']['kernel_ops']} kernel ops)")
    for name, r in (("this", t), ("baseline", b)):
        s = r["sampler"]
        print(f"  {name:9} sampler V=152064 B=64: greedy {s['greedy_ms']:7.1f} ms, temperature 1 "
              f"{s['temperature_1_ms']:7.1f} ms ({s['ratio']:.2f}x, target <= 2x), seeded "
              f"{s['temperature_1_seeded_ms']:7.1f} ms ({s['ratio_seeded']:.2f}x)")


if __name__ == "__main__":
    main()
