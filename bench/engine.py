"""Engine benchmark: decode throughput, TTFT, mixed-adapter batches and memory, vs HF `generate`.

    python bench/engine.py [--model-dir DIR | --arch-7b] [--device cpu|cuda] [--dtype ...]
                           [--batches 1,16,64] [--prompt-len 64] [--gen-len 64] [--quick] [--json PATH]
    python bench/engine.py hotpath [...]   # arrival step, aten ops per decode step, sampler (bench/hotpath.py)
    python bench/engine.py structured [...]   # half-constrained vs unconstrained batch (bench/structured.py)
    python bench/engine.py --tp 2 [...]    # tensor-parallel step time, tp=2 vs tp=1 (bench/tp_bench.py)

One run measures both sides on the same machine, same checkpoint, same prompts:

- decode throughput at each batch size (random prompt token ids, greedy, EOS ignored). vlora:
  the engine's steady state, i.e. generated tokens / seconds from the end of the step in which
  every sequence got its first token to the end of the run. HF: `generate` with
  min_new_tokens = max_new_tokens, decode = (t[N tokens] - t[1 token]) / (N - 1) per row, the
  same window (equal-length prompts, so the batch needs no padding; attention_mask is all ones).
- TTFT of one request: text (prompt-len tokens) and one 448x448 image (256 image tokens,
  vision tower included; the HF image processor's time is reported apart, not included).
- mixed adapters: one batch whose rows are spread over 8 random rank-16 LoRA adapters (all 7
  target modules of every layer) vs the same batch with no adapter; PEFT's own mixed batch
  (`generate(adapter_names=[...])`) vs PEFT with adapters disabled as the baseline ratio. The
  adapters are random PEFT adapters converted with adapters.peft_io, so both sides use the
  same weights.
- peak memory: torch.cuda.max_memory_allocated on a GPU, the process's max RSS on a CPU.

Without --model-dir the tiny checkpoint is generated into a temp dir. --arch-7b builds the
Qwen2.5-VL-7B architecture with random bf16 weights on the GPU, saves it (with the tiny
model's tokenizer and image preprocessor config) to a temp dir the engine loads from, and
keeps the built model as the HF baseline. Imports only engine/, adapters/peft_io.py, torch,
transformers and peft (the GPU machine has no Ray/pydantic/fastapi).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from vlora.adapters.peft_io import parse_lora_state_dict, peft_target_regex  # noqa: E402
from vlora.engine.config import LORA_TARGET_MODULES, EngineConfig  # noqa: E402
from vlora.engine.engine import LLMEngine  # noqa: E402
from vlora.engine.prompts import PreparedPrompt, PromptConfig, mrope_positions  # noqa: E402
from vlora.engine.sampling import SamplingParams  # noqa: E402
from vlora.engine.vision import VisionEncoder  # noqa: E402

IMAGE_SIZE = 448  # -> 32x32 patches -> 256 merged image tokens
IMAGE_TEXT_BEFORE, IMAGE_TEXT_AFTER = 20, 30  # random text tokens around the image block

# Qwen2.5-VL-7B (same values as /work/shared/gpu/hf_baseline.py's build()).
ARCH_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    eos_token_id=151645, pad_token_id=151643, bos_token_id=151643, tie_word_embeddings=False)
ARCH_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
ARCH_7B_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653, eos_token_id=151645, pad_token_id=151643, bos_token_id=151643)


# -- small helpers -------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def now(device: str) -> float:
    sync(device)
    return time.perf_counter()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({torch.get_num_threads()} torch threads)"


def make_image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def text_id_limit(model_dir: Path) -> int:
    """Random prompt ids stay below every special token id (and inside the vocabulary)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    ids = [text["vocab_size"]]
    for d in (cfg, text):
        for k, v in d.items():
            if k.endswith("_token_id") and isinstance(v, int):
                ids.append(v)
            elif k.endswith("_token_id") and isinstance(v, list):
                ids.extend(int(x) for x in v)
    return min(ids)


# -- checkpoints ---------------------------------------------------------------------------------
def build_7b(device: str, dtype: torch.dtype, text_overrides: dict | None = None,
             vision_overrides: dict | None = None):
    """Qwen2.5-VL-7B architecture with random weights (N(0, 0.02)) built directly on `device`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {**ARCH_7B_TEXT, **(text_overrides or {})}
    vision = {**ARCH_7B_VISION, **(vision_overrides or {})}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ARCH_7B_IDS)
    tc = cfg.text_config
    rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    if list(rope.get("mrope_section", [])) != list(text["rope_parameters"]["mrope_section"]):
        # a transformers without `rope_parameters`: the older spelling, as hf_baseline.py uses
        legacy = {k: v for k, v in text.items() if k != "rope_parameters"}
        legacy.update(rope_theta=text["rope_parameters"]["rope_theta"],
                      rope_scaling={"type": "mrope", "mrope_section": text["rope_parameters"]["mrope_section"]})
        cfg = Qwen2_5_VLConfig(text_config=legacy, vision_config=vision, tie_word_embeddings=False, **ARCH_7B_IDS)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def save_with_tiny_tokenizer(model, out_dir: Path, tiny_dir: Path) -> Path:
    """save_pretrained + the tiny model's tokenizer/preprocessor files, so the engine can load it."""
    model.save_pretrained(out_dir)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "preprocessor_config", "special_tokens")):
            shutil.copy(f, out_dir / f.name)
    return out_dir


# -- vlora engine ----------------------------------------------------------------------------------
def engine_decode(engine: LLMEngine, prompts: list[list[int]], gen_len: int, device: str,
                  adapters: list[str | None] | None = None, sampling: SamplingParams | None = None,
                  **request_kw) -> dict:
    """Run the batch to completion; steady-state decode = tokens after every row has its first token.

    Greedy by default; `sampling` and `request_kw` (e.g. `optimal=`) go to every add_request.
    """
    sp = sampling or SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    B = len(prompts)
    t0 = now(device)
    for i, p in enumerate(prompts):
        engine.add_request(p, sp, adapters[i] if adapters else None, **request_kw)
    steps: list[tuple[float, int, int]] = []  # (end time, tokens generated in the step, rows with a token so far)
    started: set[str] = set()
    while engine.has_unfinished():
        outs = engine.step()
        t = time.perf_counter()  # step() ends in the sampler's .tolist(): the device is synced
        n = 0
        for o in outs:
            started.add(o.request_id)
            n += sum(len(c.token_ids) for c in o.choices)
        steps.append((t, n, len(started)))
    total = sum(n for _, n, _ in steps)
    if total != B * gen_len:
        raise RuntimeError(f"expected {B * gen_len} generated tokens, got {total}")
    k = next(i for i, (_, _, s) in enumerate(steps) if s == B)
    window = steps[k + 1:]
    dt = steps[-1][0] - steps[k][0]
    toks = sum(n for _, n, _ in window)
    return dict(decode_tok_s=toks / dt if dt > 0 else float("nan"), decode_step_ms=dt / max(1, len(window)) * 1e3,
                prefill_steps=k + 1, decode_steps=len(window), ttft_all_ms=(steps[k][0] - t0) * 1e3,
                e2e_tok_s=total / (steps[-1][0] - t0))


def engine_first_token(engine: LLMEngine, prompt, device: str, vision: VisionEncoder | None = None,
                       pixels: torch.Tensor | None = None, grid=None) -> tuple[float, float]:
    """(ms from submit to first token, ms of it in the vision tower) for one request."""
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    t0 = now(device)
    embeds = None
    if vision is not None:
        embeds = vision.encode([pixels], [grid])[0]
    t_vis = now(device) if vision is not None else t0
    engine.add_request(prompt, sp, image_embeds=embeds)
    got = False
    while not got:
        got = any(c.token_ids for o in engine.step() for c in o.choices)
    t1 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (t1 - t0) * 1e3, (t_vis - t0) * 1e3


# -- HF baseline -----------------------------------------------------------------------------------
@torch.inference_mode()
def hf_generate_s(model, ids: torch.Tensor, new: int, device: str, **kw) -> float:
    """Seconds for one greedy `generate` of exactly `new` tokens per row (EOS suppressed by min_new_tokens)."""
    am = torch.ones_like(ids)
    t0 = now(device)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=model.generation_config.pad_token_id, **kw)
    t1 = now(device)
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {new}")
    return t1 - t0


def hf_stats(batch: int, gen_len: int, t1: float, tn: float) -> dict:
    """Decode per step = (t[N tokens] - t[1 token]) / (N - 1): the same window as the engine's."""
    dec = (tn - t1) / (gen_len - 1)
    return dict(decode_tok_s=batch / dec if dec > 0 else float("nan"), decode_step_ms=dec * 1e3,
                ttft_all_ms=t1 * 1e3, e2e_tok_s=batch * gen_len / tn)


# -- the benchmark ---------------------------------------------------------------------------------
class Meter:
    """Runs a measured call; on CUDA also tracks each side's transient peak above what was allocated."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.transient: dict[str, int] = {}

    def __call__(self, side: str, fn, *args, **kw):
        if self.cuda:
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        out = fn(*args, **kw)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() - start
            self.transient[side] = max(self.transient.get(side, 0), peak)
        return out


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else current_rss_bytes()


def current_rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["decode_tok_s"])
    out = dict(ordered[len(ordered) // 2])
    out["runs_tok_s"] = [round(r["decode_tok_s"], 1) for r in runs]
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:>{width}{spec}}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="Qwen2.5-VL checkpoint (default: the tiny model, generated into a temp dir)")
    p.add_argument("--arch-7b", action="store_true",
                   help="Qwen2.5-VL-7B architecture with random bf16 weights, built on the GPU (needs CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batches", default=None, help="decode batch sizes, comma-separated (default 1,16,64)")
    p.add_argument("--prompt-len", type=int, default=None, help="random prompt token ids per row (default 64)")
    p.add_argument("--gen-len", type=int, default=None, help="generated tokens per row (default 64)")
    p.add_argument("--mixed-batch", type=int, default=None, help="rows in the mixed-adapter batch (default 16)")
    p.add_argument("--num-adapters", type=int, default=8, help="adapters the mixed batch is spread over")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per measurement, vlora and HF alternating; the median is reported (default 3)")
    p.add_argument("--ttft-runs", type=int, default=None, help="runs per TTFT median (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF/PEFT baseline (ratios then missing)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's mixed batch")
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU run in well under 2 minutes)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (EngineConfig.enforce_eager); the static buffers are still used")
    p.add_argument("--json", help="also write the results as JSON here")
    a = p.parse_args(argv)
    q = a.quick
    a.batches = [int(b) for b in (a.batches or ("1,4,8" if q else "1,16,64")).split(",")]
    a.prompt_len = a.prompt_len or (16 if q else 64)
    a.gen_len = a.gen_len or (16 if q else 64)
    a.mixed_batch = a.mixed_batch or (8 if q else 16)
    a.repeats = a.repeats or (2 if q else 3)
    a.ttft_runs = a.ttft_runs or (3 if q else 5)
    if a.gen_len < 2:
        p.error("--gen-len must be >= 2 (decode is measured after the first token)")
    if min(a.batches + [a.mixed_batch, a.prompt_len, a.num_adapters, a.lora_rank]) < 1:
        p.error("batch sizes, --prompt-len, --num-adapters and --lora-rank must be >= 1")
    if a.arch_7b and a.model_dir:
        p.error("--arch-7b builds its own checkpoint; do not pass --model-dir with it")
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}, but torch {torch.__version__} sees no CUDA device")
    if a.arch_7b and not a.device.startswith("cuda"):
        p.error("--arch-7b needs a CUDA GPU (the 7B architecture is ~16 GB in bf16 and is built on the GPU); "
                "run it on the GPU machine, or drop --arch-7b to benchmark the tiny model")
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    return a


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hotpath"]:  # the hot-path figures (arrival step, aten ops per step, sampler): bench/hotpath.py
        import hotpath

        return hotpath.main(argv[1:])
    if argv[:1] == ["structured"]:  # half-constrained vs unconstrained decode batches: bench/structured.py
        import structured

        def build(tmp: Path, dev: str) -> Path:
            from vlora.engine.tiny import write_tiny_model

            model = build_7b(dev, torch.bfloat16)
            out = save_with_tiny_tokenizer(model, tmp / "qwen2_5_vl_7b_random", write_tiny_model(tmp / "tiny", seed=0))
            del model
            torch.cuda.empty_cache()
            return out

        return structured.main(argv[1:], build_7b=build)

    if "--tp" in argv:  # tensor-parallel step time, tp=N vs tp=1 (bench/tp_bench.py)
        import tp_bench

        return tp_bench.main(argv, engine_decode)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from PEFT/transformers
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="vlora-bench-"))
    try:
        results = Bench(args, tmp).run()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}", flush=True)
    return results


class Bench:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.dev = args.device
        self.dtype = getattr(torch, args.dtype)
        self.cuda = self.dev.startswith("cuda")
        self.meter = Meter(self.dev)
        self.gen = torch.Generator().manual_seed(0)
        self.R: dict = {}

    def rand_ids(self, n: int) -> list[int]:
        return torch.randint(0, self.id_hi, (n,), generator=self.gen).tolist()

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        import peft

        a, dev = self.args, self.dev
        t = time.perf_counter()
        self.hf = None
        self.hf_static = 0
        if a.arch_7b:
            from vlora.engine.tiny import write_tiny_model

            tiny = write_tiny_model(self.tmp / "tiny", seed=0)
            before = allocated(dev)
            self.hf = build_7b(dev, self.dtype)
            self.hf_static = allocated(dev) - before
            self.model_dir = save_with_tiny_tokenizer(self.hf, self.tmp / "qwen2_5_vl_7b_random", tiny)
            self.model_label = "Qwen2.5-VL-7B architecture, random weights"
        elif a.model_dir:
            self.model_dir = Path(a.model_dir)
            self.model_label = str(self.model_dir)
        else:
            from vlora.engine.tiny import write_tiny_model

            self.model_dir = write_tiny_model(self.tmp / "tiny", seed=0)
            self.model_label = "tiny (engine.tiny, generated)"
        self.setup_s = time.perf_counter() - t
        self.pcfg = PromptConfig.from_pretrained(self.model_dir)
        self.id_hi = text_id_limit(self.model_dir)

        max_b = max(a.batches + [a.mixed_batch])
        block = EngineConfig(str(self.model_dir)).block_size
        image_len = IMAGE_TEXT_BEFORE + 2 + (IMAGE_SIZE // 28) ** 2 + IMAGE_TEXT_AFTER
        blocks_per_seq = math.ceil((max(a.prompt_len, image_len) + a.gen_len) / block)
        self.cfg = EngineConfig(str(self.model_dir), device=dev, dtype=a.dtype,
                                num_kv_blocks=int(max_b * blocks_per_seq * 1.1) + 8, max_num_seqs=max_b,
                                max_loras=a.num_adapters, max_lora_rank=a.lora_rank,
                                **({"enforce_eager": True} if a.enforce_eager else {}))
        t = time.perf_counter()
        before = allocated(dev)
        self.engine = LLMEngine(self.cfg)
        self.vision = VisionEncoder.from_pretrained(self.model_dir, dev, self.dtype)
        self.engine_static = allocated(dev) - before
        self.engine_load_s = time.perf_counter() - t
        if self.hf is None and not a.no_hf:
            from transformers import Qwen2_5_VLForConditionalGeneration

            before = allocated(dev)
            self.hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_dir, dtype=self.dtype)
            self.hf = self.hf.to(dev).eval()
            self.hf_static = allocated(dev) - before
        mc = self.engine.model.cfg
        self.R["meta"] = dict(
            device=dev, device_name=device_name(dev), torch=torch.__version__, transformers=transformers.__version__,
            peft=peft.__version__, python=platform.python_version(), dtype=a.dtype, model=self.model_label,
            text_layers=mc.num_layers, hidden=mc.hidden_size, vocab=mc.vocab_size, prompt_len=a.prompt_len,
            gen_len=a.gen_len, batches=a.batches, mixed_batch=a.mixed_batch, num_adapters=a.num_adapters,
            lora_rank=a.lora_rank, repeats=a.repeats, enforce_eager=a.enforce_eager, ttft_runs=a.ttft_runs, quick=a.quick,
            torch_threads=torch.get_num_threads(), kv_blocks=self.cfg.num_kv_blocks, block_size=self.cfg.block_size,
            max_num_seqs=self.cfg.max_num_seqs, max_num_batched_tokens=self.cfg.max_num_batched_tokens,
            setup_s=round(self.setup_s, 1), engine_load_s=round(self.engine_load_s, 1))
        m = self.R["meta"]
        print("vlora engine benchmark (bench/engine.py)")
        print(f"device: {dev} = {m['device_name']}; torch {m['torch']}, transformers {m['transformers']}, "
              f"peft {m['peft']}; dtype {a.dtype}")
        print(f"model: {self.model_label}: {mc.num_layers} layers, hidden {mc.hidden_size}, vocab {mc.vocab_size}; "
              f"engine: {self.cfg.num_kv_blocks} KV blocks x {self.cfg.block_size}, max_num_seqs {max_b}, "
              f"max_num_batched_tokens {self.cfg.max_num_batched_tokens}")
        print(f"workload: random prompt ids, prompt {a.prompt_len} tokens, {a.gen_len} generated, greedy, ignore_eos; "
              f"median of {a.repeats} runs (vlora and HF alternating); setup {self.setup_s:.1f} s, "
              f"engine+vision load {self.engine_load_s:.1f} s", flush=True)

    # -- measurements -------------------------------------------------------------------------
    def run(self) -> dict:
        self.setup()
        self.decode()
        self.ttft()
        self.mixed()
        self.memory()
        return self.R

    def decode(self) -> None:
        a, dev, m = self.args, self.dev, self.meter
        print()
        print("decode throughput, steady state (generated tok/s after every row has its first token)")
        print(f"{'batch':>5} {'vlora tok/s':>12} {'HF tok/s':>10} {'vlora/HF':>9} {'vlora ms/step':>14} "
              f"{'HF ms/step':>11} {'vlora e2e tok/s':>16} {'HF e2e tok/s':>13}", flush=True)
        self.R["decode"] = []
        for B in a.batches:
            prompts = [self.rand_ids(a.prompt_len) for _ in range(B)]
            ids = torch.tensor(prompts, device=dev)
            engine_decode(self.engine, prompts, 3, dev)  # warm-up: allocator, kernels for this batch shape
            if self.hf is not None:
                hf_generate_s(self.hf, ids, 2, dev)
            runs, t1s, tns = [], [], []
            for _ in range(a.repeats):
                runs.append(m("vlora", engine_decode, self.engine, prompts, a.gen_len, dev))
                if self.hf is not None:
                    t1s.append(m("hf", hf_generate_s, self.hf, ids, 1, dev))
                    tns.append(m("hf", hf_generate_s, self.hf, ids, a.gen_len, dev))
            o = median_run(runs)
            h = hf_stats(B, a.gen_len, median(t1s), median(tns)) if t1s else None
            r = ratio(o["decode_tok_s"], h and h["decode_tok_s"])
            self.R["decode"].append(dict(batch=B, vlora=o, hf=h, vlora_over_hf=r))
            print(f"{B:>5} {o['decode_tok_s']:>12.1f} {fmt(h and h['decode_tok_s'], '.1f', 10)} "
                  f"{fmt(r, '.2f', 8)}x {o['decode_step_ms']:>14.2f} {fmt(h and h['decode_step_ms'], '.2f', 11)} "
                  f"{o['e2e_tok_s']:>16.1f} {fmt(h and h['e2e_tok_s'], '.1f', 13)}", flush=True)
        print("  vlora tok/s of each run: " + "; ".join(
            f"batch {d['batch']}: {d['vlora']['runs_tok_s']}" for d in self.R["decode"]))

    def ttft(self) -> None:
        a, dev, m, hf = self.args, self.dev, self.meter, self.hf
        n = a.ttft_runs
        # text
        prompt = self.rand_ids(a.prompt_len)
        ids = torch.tensor([prompt], device=dev)
        engine_first_token(self.engine, prompt, dev)
        if hf is not None:
            hf_generate_s(hf, ids, 1, dev)
        ours_text, hf_text = [], []
        for _ in range(n):
            ours_text.append(m("vlora", engine_first_token, self.engine, prompt, dev)[0])
            if hf is not None:
                hf_text.append(m("hf", hf_generate_s, hf, ids, 1, dev) * 1e3)
        # image: HF's processor gives the patches both sides use
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as IP
        except ImportError:  # older transformers
            from transformers import Qwen2VLImageProcessor as IP
        ip = IP.from_pretrained(self.model_dir) if (self.model_dir / "preprocessor_config.json").exists() else IP()
        img = make_image(IMAGE_SIZE)
        ip(images=[img], return_tensors="pt")
        pre_ms = []
        for _ in range(n):
            t = time.perf_counter()
            feats = ip(images=[img], return_tensors="pt")
            pre_ms.append((time.perf_counter() - t) * 1e3)
        pixels = feats["pixel_values"].to(dev, self.dtype)
        grid_thw = feats["image_grid_thw"].to(dev)
        grid = tuple(int(x) for x in feats["image_grid_thw"][0].tolist())
        pc = self.pcfg
        n_img = pc.image_token_count(grid)
        img_ids = (self.rand_ids(IMAGE_TEXT_BEFORE) + [pc.vision_start_token_id] + [pc.image_token_id] * n_img
                   + [pc.vision_end_token_id] + self.rand_ids(IMAGE_TEXT_AFTER))
        positions, rope_delta = mrope_positions(img_ids, [grid], pc)
        span = (IMAGE_TEXT_BEFORE + 1, IMAGE_TEXT_BEFORE + 1 + n_img)
        img_prompt = PreparedPrompt(img_ids, positions, rope_delta, image_grids=[grid], image_token_spans=[span],
                                    num_image_tokens=n_img)
        ids = torch.tensor([img_ids], device=dev)
        kw = dict(pixel_values=pixels, image_grid_thw=grid_thw)
        if hf is not None and "mm_token_type_ids" in inspect.signature(hf.model.get_rope_index).parameters:
            kw["mm_token_type_ids"] = (ids == pc.image_token_id).long()  # transformers >= 5.2x wants it
        engine_first_token(self.engine, img_prompt, dev, self.vision, pixels, grid)
        if hf is not None:
            hf_generate_s(hf, ids, 1, dev, **kw)
        ours_img, hf_img, ours_vis, hf_vis = [], [], [], []
        for _ in range(n):
            ours_img.append(m("vlora", engine_first_token, self.engine, img_prompt, dev, self.vision, pixels, grid)[0])
            if hf is not None:
                hf_img.append(m("hf", hf_generate_s, hf, ids, 1, dev, **kw) * 1e3)
        for _ in range(n):
            t = now(dev)
            m("vlora", self.vision.encode, [pixels], [grid])
            ours_vis.append((now(dev) - t) * 1e3)
            if hf is not None:
                with torch.inference_mode():
                    t = now(dev)
                    m("hf", hf.model.visual, pixels, grid_thw=grid_thw)
                    hf_vis.append((now(dev) - t) * 1e3)

        def med(xs):
            return median(xs) if xs else None

        rows = [(f"text, {a.prompt_len} tokens", "text", med(ours_text), med(hf_text)),
                (f"image {IMAGE_SIZE}x{IMAGE_SIZE}, {len(img_ids)} tokens", "image", med(ours_img), med(hf_img)),
                (f"  of which vision tower ({n_img} tok)", "vision_tower", med(ours_vis), med(hf_vis))]
        self.R["ttft_ms"] = {key: dict(vlora=o, hf=h, vlora_over_hf=ratio(o, h)) for _, key, o, h in rows}
        self.R["ttft_ms"].update(image_preprocess=median(pre_ms), image_tokens=n_img, image_prompt_tokens=len(img_ids),
                                 grid=list(grid))
        print()
        print(f"TTFT, one request, median of {n} (vlora/HF < 1 is better)")
        print(f"{'':>34} {'vlora ms':>9} {'HF ms':>9} {'vlora/HF':>9}")
        for label, _, o, h in rows:
            print(f"{label:>34} {o:>9.1f} {fmt(h, '.1f', 9)} {fmt(ratio(o, h), '.2f', 8)}x")
        print(f"  (HF Qwen2VLImageProcessorPil on the {IMAGE_SIZE}x{IMAGE_SIZE} image, not in TTFT: "
              f"{median(pre_ms):.1f} ms; grid {grid})", flush=True)

    def mixed(self) -> None:
        """Mixed-adapter batch vs base-only, on the engine and on PEFT, with the same random adapters."""
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        a, dev, m = self.args, self.dev, self.meter
        B, A, r = a.mixed_batch, a.num_adapters, a.lora_rank
        names = [f"a{i}" for i in range(A)]
        alpha = 2 * r
        lcfg = dict(r=r, lora_alpha=alpha, target_modules=peft_target_regex(LORA_TARGET_MODULES),
                    init_lora_weights=False, lora_dropout=0.0)  # random A and B (PEFT's default B is zero)
        base = self.hf
        if base is None:  # --no-hf: a throwaway HF model just to make the PEFT adapters
            from transformers import Qwen2_5_VLForConditionalGeneration

            base = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.model_dir, dtype=self.dtype).to(dev)
        torch.manual_seed(1)
        before = allocated(dev)
        pm = get_peft_model(base, LoraConfig(**lcfg), adapter_name=names[0])
        for nm in names[1:]:
            pm.add_adapter(nm, LoraConfig(**lcfg))
        pm.to(dev, self.dtype).eval()
        self.peft_static = allocated(dev) - before
        for nm in names:
            sd = get_peft_model_state_dict(pm, adapter_name=nm)
            self.engine.add_lora(nm, parse_lora_state_dict(sd, {"r": r, "lora_alpha": alpha}))
        prompts = [self.rand_ids(a.prompt_len) for _ in range(B)]
        ids = torch.tensor(prompts, device=dev)
        rows = [names[i % A] for i in range(B)]
        use_peft = self.hf is not None and not a.no_peft
        engine_decode(self.engine, prompts, 3, dev, rows)  # warm-up (and loads the slots)
        engine_decode(self.engine, prompts, 3, dev)
        if use_peft:
            hf_generate_s(pm, ids, 2, dev, adapter_names=rows)
            with pm.disable_adapter():
                hf_generate_s(pm, ids, 2, dev)
        om, ob, pm1, pmn, pb1, pbn = [], [], [], [], [], []
        for _ in range(a.repeats):
            om.append(m("vlora", engine_decode, self.engine, prompts, a.gen_len, dev, rows))
            ob.append(m("vlora", engine_decode, self.engine, prompts, a.gen_len, dev))
            if use_peft:
                pm1.append(m("hf", hf_generate_s, pm, ids, 1, dev, adapter_names=rows))
                pmn.append(m("hf", hf_generate_s, pm, ids, a.gen_len, dev, adapter_names=rows))
                with pm.disable_adapter():
                    pb1.append(m("hf", hf_generate_s, pm, ids, 1, dev))
                    pbn.append(m("hf", hf_generate_s, pm, ids, a.gen_len, dev))
        pm.unload()  # the HF model without LoRA layers again
        for nm in names:
            self.engine.remove_lora(nm)
        ours_m, ours_b = median_run(om), median_run(ob)
        out = dict(batch=B, adapters=A, rank=r, lora_alpha=alpha, targets=list(LORA_TARGET_MODULES),
                   vlora=dict(mixed=ours_m, base=ours_b, mixed_over_base=ratio(ours_m["decode_tok_s"],
                                                                               ours_b["decode_tok_s"])))
        if use_peft:
            p_m = hf_stats(B, a.gen_len, median(pm1), median(pmn))
            p_b = hf_stats(B, a.gen_len, median(pb1), median(pbn))
            out["peft"] = dict(mixed=p_m, disabled=p_b, mixed_over_base=ratio(p_m["decode_tok_s"], p_b["decode_tok_s"]))
            out["vlora_mixed_over_peft_mixed"] = ratio(ours_m["decode_tok_s"], p_m["decode_tok_s"])
        self.R["mixed_adapters"] = out
        print()
        print(f"mixed adapters: batch {B} over {A} random LoRA adapters (rank {r}, {len(LORA_TARGET_MODULES)} modules "
              f"x {self.engine.model.cfg.num_layers} layers), steady-state decode tok/s")
        print(f"{'':>6} {'mixed':>9} {'no adapter':>11} {'mixed/none':>11}")
        print(f"{'vlora':>6} {ours_m['decode_tok_s']:>9.1f} {ours_b['decode_tok_s']:>11.1f} "
              f"{out['vlora']['mixed_over_base']:>10.2f}x   (runs: mixed {ours_m['runs_tok_s']}, "
              f"none {ours_b['runs_tok_s']})")
        if use_peft:
            p = out["peft"]
            print(f"{'PEFT':>6} {fmt(p['mixed']['decode_tok_s'], '.1f', 9)} {fmt(p['disabled']['decode_tok_s'], '.1f', 11)} "
                  f"{fmt(p['mixed_over_base'], '.2f', 10)}x   (generate(adapter_names=per row); none = disable_adapter())")
            print(f"vlora mixed / PEFT mixed: {fmt(out['vlora_mixed_over_peft_mixed'], '.2f', 0)}x", flush=True)

    def memory(self) -> None:
        print()
        if self.cuda:
            eng = self.engine_static + self.meter.transient.get("vlora", 0)
            hf = self.hf_static + self.meter.transient.get("hf", 0) if self.hf is not None else None
            self.R["memory"] = dict(
                kind="torch.cuda.max_memory_allocated", engine_static_bytes=self.engine_static,
                engine_peak_bytes=eng, hf_static_bytes=self.hf_static, hf_peak_bytes=hf,
                peft_adapters_bytes=getattr(self, "peft_static", None))
            print(f"GPU memory (torch.cuda allocated): vlora engine + vision tower {gib(self.engine_static)} resident "
                  f"(weights, KV pool, LoRA slots), peak {gib(eng)}"
                  + (f"; HF model {gib(self.hf_static)} resident, peak {gib(hf)} (PEFT adapters "
                     f"{gib(getattr(self, 'peft_static', 0))} more)" if hf is not None else ""))
        else:
            self.R["memory"] = dict(kind="RSS", engine_load_rss_bytes=self.engine_static,
                                    hf_load_rss_bytes=self.hf_static, process_max_rss_bytes=max_rss_bytes())
            print(f"memory (RSS): engine + vision tower load +{gib(self.engine_static)}, HF model load "
                  f"+{gib(self.hf_static)}; process max RSS {gib(max_rss_bytes())} (everything, both sides)")


if __name__ == "__main__":
    main()
