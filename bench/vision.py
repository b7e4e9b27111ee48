"""Vision tower: ours (engine/vision_tower.py) vs HF's Qwen2_5_VisionTransformerPretrainedModel.

    python bench/vision.py [--arch tiny|7b] [--device cpu|cuda] [--dtype float32|bfloat16]
                           [--repeats 5] [--transfer] [--serve] [--json PATH]

One run, both towers, the same weights (ours loads HF's state dict) and the same patches:

- tower time at 448x448 (1 image, 1024 patches), 1024x768 (1036x756 after resizing, 3996
  patches) and a batch of 8 mixed sizes, in one forward each; blocks of runs alternate between
  the two towers and the median is reported, with the max |difference| of the outputs, and the
  best (minimum) run of each: on a shared machine that is the least disturbed one.
- `--profile`: torch.profiler over 10 forwards of each tower at 448x448, self CPU time per forward
  by kind of work (full-attention SDPA, window SDPA, patch embed, other linear layers, all other
  ops), and the bound that work puts on the speedup: HF's total over ours' SDPA + GEMM time.
- `--transfer`: what an image's embeddings cost between the VisionEncoder and the Decoder
  (256 tokens x out_hidden in the serving dtype): the device -> host copy (GPU only), Ray's
  object store put + get, host -> device.
- `--serve`: image requests/s through Serve (the VisionEncoder deployment, distinct images so the
  cache never hits) with 8 concurrent clients vs one client, batching on (max_batch_size 8) and
  off (max_batch_size 1). Needs Ray.

`--arch 7b` builds Qwen2.5-VL-7B's vision tower (depth 32, hidden 1280, 16 heads, window 112)
with random weights; without it the tiny checkpoint's tower is used. Imports only engine/,
torch and transformers for the tower part (the GPU machine has no Ray unless carried).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen2_5_VLConfig  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel,
)

from vlora.engine.vision import VisionEncoder  # noqa: E402
from vlora.engine.vision_tower import VisionConfig, VisionTower  # noqa: E402

SEVEN_B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
               hidden_act="silu", in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
               window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
MIXED = [(448, 448), (1024, 768), (640, 480), (224, 224), (301, 97), (57, 333), (800, 600), (512, 512)]  # WxH


def grid_of(width: int, height: int, factor: int = 28) -> tuple[int, int, int]:
    """Qwen2.5-VL's smart_resize grid (default min/max pixels): sides rounded to multiples of 28."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    return (1, h // 14, w // 14)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.processor() or platform.machine()} CPU, {cpus} usable cores, {torch.get_num_threads()} threads"


def build_towers(arch: str, device: str, dtype: torch.dtype, tmp: Path):
    """(HF tower, our VisionEncoder) with identical weights."""
    if arch == "7b":
        vcfg = Qwen2_5_VLConfig(vision_config=SEVEN_B).vision_config
        vcfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(vcfg, attn_implementation="sdpa", dtype=dtype)
        cfg = VisionConfig(**{**SEVEN_B, "fullatt_block_indexes": tuple(SEVEN_B["fullatt_block_indexes"])})
        with torch.device("meta"):
            tower = VisionTower(cfg)
        tower = tower.to_empty(device=device).to(dtype)
        tower.load_checkpoint_state(hf.state_dict())
        return hf.eval(), VisionEncoder(tower)
    from vlora.engine.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp / "tiny", seed=0)
    ours = VisionEncoder.from_pretrained(model_dir, device=device, dtype=dtype)
    vcfg = Qwen2_5_VLConfig.from_pretrained(model_dir).vision_config
    vcfg._attn_implementation = "sdpa"
    with torch.device(device):
        hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(vcfg, attn_implementation="sdpa", dtype=dtype)
    from vlora.engine.vision import load_vision_state_dict

    hf.load_state_dict(load_vision_state_dict(model_dir, device=device))
    return hf.eval(), ours


def time_towers(hf, ours: VisionEncoder, grids, device: str, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    pixels = [torch.randn(t * h * w, ours.patch_dim, generator=gen).to(device, dtype) for t, h, w in grids]
    packed = torch.cat(pixels)
    grid_thw = torch.tensor(grids, device=device)

    def run_hf():
        out = hf(packed, grid_thw=grid_thw)
        return getattr(out, "pooler_output", out)

    def run_ours():
        return torch.cat(ours.encode(pixels, grids))

    with torch.inference_mode():
        diff = (run_hf().float() - run_ours().float()).abs().max().item()
        for fn in (run_hf, run_ours, run_hf, run_ours):  # warm-up (first-call allocations, grid caches)
            fn()
        sync(device)
        times: dict[str, list[float]] = {"hf": [], "vlora": []}
        for _ in range(repeats):
            for name, fn in (("hf", run_hf), ("vlora", run_ours)):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    hf_s, ours_s = statistics.median(times["hf"]), statistics.median(times["vlora"])
    hf_best, ours_best = min(times["hf"]), min(times["vlora"])
    return {"grids": grids, "patches": int(sum(t * h * w for t, h, w in grids)), "hf_ms": hf_s * 1e3,
            "vlora_ms": ours_s * 1e3, "speedup": hf_s / ours_s, "hf_best_ms": hf_best * 1e3,
            "vlora_best_ms": ours_best * 1e3, "speedup_best": hf_best / ours_best, "max_abs_diff": diff, "runs": times}


def _kind(name: str, shapes: list, frame_len: int, patch_dim: int) -> str:
    """What a profiled op does: the work both towers must do, or the rest."""
    if "scaled_dot_product" in name and name.startswith("aten::_"):
        return "sdpa_full" if shapes and len(shapes[0]) == 4 and shapes[0][2] == frame_len else "sdpa_window"
    if name == "aten::mkldnn_convolution" or (name == "aten::mm" and shapes and shapes[0][-1:] == [patch_dim]):
        return "patch_embed"
    if name in ("aten::mm", "aten::addmm"):
        return "linear"
    return "other"


def profile_towers(hf, ours: VisionEncoder, grid, device: str, dtype: torch.dtype, rounds: int = 7) -> dict:
    """Self CPU ms per forward of one image by kind of work (`_kind`), and the top ops, for each tower.

    Rounds alternate between the towers; each round times 2 forwards without the profiler and
    profiles 2 more; medians over rounds. The profiler adds a few microseconds to every op, which
    inflates HF's total (3x more ops) more than ours, so the bound uses HF's unprofiled time.
    """
    from torch.profiler import ProfilerActivity, profile

    t, h, w = grid
    pixels = torch.randn(t * h * w, ours.patch_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    grid_thw = torch.tensor([grid], device=device)
    runs = {"hf": lambda: hf(pixels, grid_thw=grid_thw), "vlora": lambda: ours.encode([pixels], [grid])}
    walls: dict[str, list[float]] = {n: [] for n in runs}
    kinds: dict[str, list[dict]] = {n: [] for n in runs}
    ops: dict[str, list[dict]] = {n: [] for n in runs}  # per round: op -> (ms, calls) per forward
    with torch.inference_mode():
        for fn in runs.values():
            fn(), fn()
        for _ in range(rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn(), fn()
                walls[name].append((time.perf_counter() - t0) * 1e3 / 2)
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    fn(), fn()
                k: dict[str, float] = {}
                o: dict[str, list] = {}
                for e in prof.key_averages(group_by_input_shape=True):
                    ms = e.self_cpu_time_total / 1e3 / 2
                    kind = _kind(e.key, e.input_shapes, h * w, ours.patch_dim)
                    k[kind] = k.get(kind, 0.0) + ms
                    op = o.setdefault(e.key, [0.0, 0])
                    op[0] += ms
                    op[1] += e.count // 2
                kinds[name].append(k)
                ops[name].append(o)
    out: dict = {}
    for name in runs:
        med = {kind: statistics.median(r.get(kind, 0.0) for r in kinds[name]) for kind in
               ("sdpa_full", "sdpa_window", "patch_embed", "linear", "other")}
        names = {op for r in ops[name] for op in r}
        op_ms = {op: statistics.median(r.get(op, (0.0, 0))[0] for r in ops[name]) for op in names}
        calls = {op: max(r.get(op, (0.0, 0))[1] for r in ops[name]) for op in names}
        top = sorted(op_ms.items(), key=lambda kv: -kv[1])[:12]
        out[name] = {"wall_ms": statistics.median(walls[name]),
                     "profiled_total_ms": statistics.median(sum(r.values()) for r in kinds[name]),
                     "kinds_ms": med, "ops": {op: {"ms": ms, "calls": calls[op]} for op, ms in top},
                     "ops_per_forward": sum(calls.values())}
    floor = statistics.median(sum(r.get(k, 0.0) for k in ("sdpa_full", "patch_embed", "linear")) for r in kinds["vlora"])
    out["vlora_sdpa_full_and_gemm_ms"] = floor
    out["max_speedup_if_all_other_work_were_free"] = out["hf"]["wall_ms"] / floor
    return out


def time_transfer(out_hidden: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    """Per image (256 tokens): device -> host, Ray object store put + get, host -> device."""
    from vlora.deployments.messages import EncodedRequest
    from vlora.engine.prompts import PreparedPrompt

    emb = torch.randn(256, out_hidden).to(device, dtype)
    prompt = PreparedPrompt.__new__(PreparedPrompt)  # the prompt's own cost is not the embeddings'
    res: dict[str, float] = {"bytes": emb.numel() * emb.element_size()}

    def med(fn) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    host = emb.cpu()
    if device == "cuda":
        res["d2h_ms"] = med(lambda: emb.cpu())
        res["h2d_ms"] = med(lambda: host.to(device))
    try:
        import ray
    except ImportError:
        res["ray"] = "not measured: Ray not importable"
        return res
    if not ray.is_initialized():
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    # baseline: the tensor pickled as a torch tensor (how EncodedRequest travelled before it sent numpy)
    for name, msg in (("torch_pickled", (prompt, host)), ("encoded_request", EncodedRequest(prompt, host))):
        res[f"{name}_put_ms"] = med(lambda: ray.put(msg))
        ref = ray.put(msg)
        res[f"{name}_get_ms"] = med(lambda: ray.get(ref))
    got = ray.get(ray.put(EncodedRequest(prompt, host))).image_embeds
    res["encoded_request_equal_after_ray"] = bool(torch.equal(got, host))
    res["dtype_after_ray"] = str(got.dtype)
    return res


def time_serve(clients_list: list[int], n_requests: int) -> dict:
    """Image requests/s through the VisionEncoder deployment (Serve handle), batching on and off."""
    import asyncio

    import ray
    from ray import serve

    from vlora.deployments.app import _deployment, prepare_config
    from vlora.deployments.preprocessor import Preprocessor
    from vlora.deployments.vision_encoder import VisionEncoderDeployment

    def chat(seed: int) -> list[dict]:
        """One user turn with a distinct 448x448 noise PNG (data URL) and a question."""
        import base64
        import io

        import numpy as np
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.random.RandomState(seed).randint(0, 255, (448, 448, 3), dtype=np.uint8)).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is this?"}]}]

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = {"model_dir": f"{tmp}/tiny", "adapter_store_dir": f"{tmp}/store", "vision_cache_mb": 0}
        pre = Preprocessor(prepare_config(base))
        reqs = [asyncio.run(pre.prepare_chat(chat(i))) for i in range(n_requests)]
        for max_batch in (1, 8):
            config = prepare_config({**base, "vision_encoder": {"max_batch_size": max_batch, "num_cpus": 0.5}})
            app = _deployment(VisionEncoderDeployment, "VisionEncoder", config.vision_encoder).bind(config)
            handle = serve.run(app, name="vision-bench", route_prefix=None)
            [handle.encode.remote(r).result() for r in reqs[:4]]  # warm-up
            for clients in clients_list:
                before = handle.stats.remote().result()
                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:  # each client sends its next request when one returns
                    list(pool.map(lambda c: [handle.encode.remote(q).result() for q in reqs[c::clients]],
                                  range(clients)))
                seconds = time.perf_counter() - t0
                after = handle.stats.remote().result()
                out[f"max_batch_{max_batch}_clients_{clients}"] = {
                    "requests_per_s": n_requests / seconds,
                    "forwards": after["num_forwards"] - before["num_forwards"],
                    "batches": after["num_batches"] - before["num_batches"]}
            serve.delete("vision-bench")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["tiny", "7b"], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", default="448,1024x768,mixed8", help="comma-separated: 448, 1024x768, mixed8")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--transfer", action="store_true")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--serve-requests", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    report: dict = {"device": device_name(args.device), "torch": torch.__version__,
                    "transformers": transformers.__version__, "arch": args.arch, "dtype": str(dtype), "cases": {}}
    print(f"device: {report['device']}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"tower {args.arch}, {dtype}")
    cases = {"448": [grid_of(448, 448)], "1024x768": [grid_of(1024, 768)], "mixed8": [grid_of(w, h) for w, h in MIXED]}
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build_towers(args.arch, args.device, dtype, Path(tmp))
        print(f"{'case':>9} {'patches':>8} {'HF ms':>9} {'vlora ms':>9} {'speedup':>8} {'max|diff|':>10}"
              f"   best of runs: {'HF ms':>9} {'vlora ms':>9} {'speedup':>8}")
        for name in filter(None, args.cases.split(",")):
            r = time_towers(hf, ours, cases[name], args.device, dtype, args.repeats)
            report["cases"][name] = r
            print(f"{name:>9} {r['patches']:>8} {r['hf_ms']:>9.2f} {r['vlora_ms']:>9.2f} {r['speedup']:>7.2f}x "
                  f"{r['max_abs_diff']:>10.1e}   {'':>13} {r['hf_best_ms']:>9.2f} {r['vlora_best_ms']:>9.2f} "
                  f"{r['speedup_best']:>7.2f}x")
        if args.profile:
            prof = report["profile_448"] = profile_towers(hf, ours, grid_of(448, 448), args.device, dtype)
            print("profile, 448x448, self CPU ms per forward:")
            for kind in ("sdpa_full", "sdpa_window", "patch_embed", "linear", "other"):
                print(f"  {kind:>12} HF {prof['hf']['kinds_ms'].get(kind, 0):7.2f}  "
                      f"vlora {prof['vlora']['kinds_ms'].get(kind, 0):7.2f}")
            print(f"  {'profiled':>12} HF {prof['hf']['profiled_total_ms']:7.2f}  vlora {prof['vlora']['profiled_total_ms']:7.2f}"
                  f"   (ops per forward: HF {prof['hf']['ops_per_forward']}, vlora {prof['vlora']['ops_per_forward']})")
            print(f"  {'unprofiled':>12} HF {prof['hf']['wall_ms']:7.2f}  vlora {prof['vlora']['wall_ms']:7.2f}")
            for name in ("hf", "vlora"):
                print(f"  top ops, {name}: " + "; ".join(f"{k} {v['ms']:.2f} ms x{v['calls']}"
                                                       for k, v in prof[name]["ops"].items()))
            print(f"  max speedup if all but SDPA (full layers) and GEMMs were free: HF "
                  f"{prof['hf']['wall_ms']:.2f} / vlora {prof['vlora_sdpa_full_and_gemm_ms']:.2f} = "
                  f"{prof['max_speedup_if_all_other_work_were_free']:.2f}x")
        if args.transfer:
            report["transfer"] = time_transfer(SEVEN_B["out_hidden_size"],  # a 7B image: 256 x 3584
                                               args.device, dtype, max(args.repeats, 20))
            print("transfer per image (256 tokens):", json.dumps(report["transfer"]))
    if args.serve:
        report["serve"] = time_serve([1, 8], args.serve_requests)
        for k, v in report["serve"].items():
            print(f"serve {k}: {v['requests_per_s']:.1f} req/s ({v['forwards']} forwards, {v['batches']} batches)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
