"""Engine vs HF (and HF+PEFT) parity in any dtype/device: the check `bench/gpu_check.sh` runs in bf16.

    python bench/gpu_parity.py [--device cuda] [--dtype bfloat16] [--json PATH]

The tiny checkpoint, 6 prompts: base rows and rows on two random PEFT adapters, in one engine
batch (prefill eager, decode through the static buffers and, on a GPU, CUDA graphs). Greedy,
16 tokens, logprobs on. HF (or HF+PEFT) then scores the engine's own sequences teacher-forced,
in the same dtype on the same device, and for every generated token:

- near-tie rule: HF's logit for the engine's token is within `tie_tol` of HF's best logit
  (in float32 that means the same argmax; in bf16, two paths may round a near-tie either way);
- logprob: |engine logprob - HF log_softmax| <= `lp_tol`.

Tolerances: float32 tie_tol 1e-4, lp_tol 1e-4 (the unit tests' bound); bfloat16 / float16
tie_tol 0.15, lp_tol 0.15 (bf16 has 8 mantissa bits: ~0.4% per rounding, accumulated over the
layers). Exit status 1 if any token breaks a rule; the JSON has every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (0.15, 0.15), "float16": (0.15, 0.15)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(TOLERANCES))
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--json")
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    import transformers
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from vlora.adapters.peft_io import load_peft_adapter
    from vlora.engine.config import EngineConfig
    from vlora.engine.engine import LLMEngine
    from vlora.engine.sampling import SamplingParams
    from vlora.engine.tiny import write_tiny_model
    from tests.unit.oracle import peft_model, random_peft_adapter

    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, a.dtype)
    tie_tol, lp_tol = TOLERANCES[a.dtype]
    tmp = Path(tempfile.mkdtemp(prefix="vlora-parity-"))
    model_dir = write_tiny_model(tmp / "tiny", seed=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapters = {"a1": random_peft_adapter(hf, tmp / "a1", seed=1, r=4, alpha=8),
                "a2": random_peft_adapter(hf, tmp / "a2", seed=2, r=8, alpha=8, use_rslora=True)}
    hf = hf.to(device=a.device, dtype=dtype)
    eng = LLMEngine(EngineConfig(str(model_dir), device=a.device, dtype=a.dtype, block_size=16, num_kv_blocks=256,
                                 max_num_seqs=8, max_loras=2, max_lora_rank=8))
    for name, path in adapters.items():
        eng.add_lora(name, load_peft_adapter(path)[0])
    texts = ["What colour is this? It is", "Hello", "Describe the image in detail please.", "A red cat",
             "Numbers: 1 2 3", "The quick brown fox"]
    names = ["a1", None, "a2", None, "a1", "a2"]
    prompts = [tok(t).input_ids for t in texts]
    sp = SamplingParams(max_tokens=a.tokens, temperature=0, ignore_eos=True, logprobs=True)
    rids = [eng.add_request(pr, sp, n) for pr, n in zip(prompts, names)]
    got = {r: ([], []) for r in rids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id][0].extend(o.choices[0].token_ids)
            got[o.request_id][1].extend(lp.logprob for lp in o.choices[0].logprobs)
    rows, bad = [], 0
    for pr, name, rid in zip(prompts, names, rids):
        toks, lps = got[rid]
        model = hf if name is None else peft_model(hf, adapters[name])
        try:
            with torch.no_grad():
                logits = model(torch.tensor([pr + toks], device=a.device)).logits[0, len(pr) - 1:-1].float()
        finally:
            if name is not None:
                model.unload()
        ref_lp = torch.log_softmax(logits, -1)
        chosen = logits.gather(1, torch.tensor(toks, device=a.device)[:, None]).squeeze(1)
        gap = (logits.max(-1).values - chosen).tolist()
        lp_err = (ref_lp.gather(1, torch.tensor(toks, device=a.device)[:, None]).squeeze(1).cpu()
                  - torch.tensor(lps)).abs().tolist()
        argmax_same = (logits.argmax(-1).cpu() == torch.tensor(toks)).float().mean().item()
        ok = max(gap) <= tie_tol and max(lp_err) <= lp_tol
        bad += not ok
        rows.append(dict(adapter=name, tokens=toks, max_tie_gap=max(gap), max_logprob_err=max(lp_err),
                         argmax_agreement=argmax_same, ok=ok))
        print(f"{str(name):5} argmax agreement {argmax_same:5.2f}  max tie gap {max(gap):.2e} (<= {tie_tol})  "
              f"max logprob err {max(lp_err):.2e} (<= {lp_tol})  {'ok' if ok else 'FAIL'}", flush=True)
    res = dict(device=a.device, device_name=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
               dtype=a.dtype, torch=torch.__version__, transformers=transformers.__version__, tie_tol=tie_tol,
               lp_tol=lp_tol, decode_steps_static=eng.runner.num_decode_steps, graphs=eng.runner.use_graphs,
               rows=rows, ok=bad == 0)
    print(f"parity {a.dtype} on {res['device_name']}: {'ok' if bad == 0 else f'{bad} rows FAIL'}; "
          f"{eng.runner.num_decode_steps} static decode steps, CUDA graphs {'on' if eng.runner.use_graphs else 'off'}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
