"""The engine's GPU-shaped hot path against HF/PEFT: unpadded mixed steps, the static decode
buffers (capture-ready: stable addresses, no host sync), and adapter slots that cannot poison
other rows."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlora.adapters.peft_io import load_peft_adapter
from vlora.engine.config import EngineConfig
from vlora.engine.engine import LLMEngine
from vlora.engine.lora import LoRASlotError, LoRAWeights
from vlora.engine.sampling import SamplingParams
from tests.unit.oracle import hf_generate, peft_generate, random_peft_adapter

GREEDY = dict(temperature=0, ignore_eos=True)
HOST_SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.is_nonzero")


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def adapters(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("hotpath_adapters")
    return {
        "a1": random_peft_adapter(hf_model, d / "a1", seed=11, r=4, alpha=8),
        "a2": random_peft_adapter(hf_model, d / "a2", seed=12, r=8, alpha=8, targets=("q_proj", "v_proj", "up_proj")),
        "a3": random_peft_adapter(hf_model, d / "a3", seed=13, r=2, alpha=4),
    }


def _engine(tiny_model_dir, **kw):
    cfg = dict(block_size=4, num_kv_blocks=512, max_loras=4, max_lora_rank=8, max_num_seqs=8)
    return LLMEngine(EngineConfig(str(tiny_model_dir), **{**cfg, **kw}))


def test_a_long_prefill_chunk_among_decode_rows_matches_hf(tiny_model_dir, tokenizer, hf_model):
    """One step packs a 2-chunk prefill's second chunk with six decoding rows: every row's tokens are HF's."""
    eng = _engine(tiny_model_dir, max_num_batched_tokens=48, max_loras=0)
    shorts = [tokenizer(t).input_ids for t in ["Hello", "A red cat", "Numbers: 1 2 3", "Why", "The sea is", "Go"]]
    long = tokenizer(" ".join(["the quick brown fox jumps over the lazy dog"] * 8)).input_ids
    assert len(long) > 48 + 6  # it cannot fit one step: chunked, and its later chunk shares a step with decodes
    sp = SamplingParams(max_tokens=10, **GREEDY)
    rids = [eng.add_request(p, sp) for p in shorts]
    got = {r: [] for r in rids}
    for o in eng.step():  # the short prompts' prefill
        got[o.request_id] += o.choices[0].token_ids
    long_id = eng.add_request(long, sp)
    got[long_id] = []
    mixed = []
    real_run = eng.runner.run

    def run(batch):  # note each step that packs a continuing prefill chunk with decode rows
        pairs = list(zip(batch.seqs, batch.num_new_tokens))
        if any(n > 1 and s.num_computed_tokens > 0 for s, n in pairs) and sum(n == 1 for _, n in pairs) >= 5:
            mixed.append(batch.num_new_tokens)
        return real_run(batch)

    eng.runner.run = run
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.choices[0].token_ids
    assert mixed  # a step ran a continuing prefill chunk (bottom-right causal) next to decode rows
    for p, r in zip(shorts + [long], rids + [long_id]):
        assert got[r] == hf_generate(hf_model, p, 10)


def test_static_decode_buffers_keep_addresses_and_never_sync(tiny_model_dir, tokenizer, hf_model, adapters):
    """Ten decode steps in one bucket: same buffer addresses, no host-sync op in the forward, HF/PEFT tokens."""
    eng = _engine(tiny_model_dir)
    for name, path in adapters.items():
        eng.add_lora(name, load_peft_adapter(path)[0])
    prompt = tokenizer("What colour is this? It is").input_ids
    names = ["a1", None, "a2", "a3", "a1"]  # 5 rows: bucket 8
    rids = [eng.add_request(prompt, SamplingParams(max_tokens=12, **GREEDY), a) for a in names]
    got = {r: [] for r in rids}
    for o in eng.step():  # prefill (eager path)
        got[o.request_id] += o.choices[0].token_ids
    runner = eng.runner
    buf = runner.buffers
    ptrs = None
    recorder = OpRecorder()
    real_forward = runner.decode_forward

    def recorded(*a, **kw):
        with recorder:
            return real_forward(*a, **kw)

    runner.decode_forward = recorded
    try:
        for _ in range(10):
            before = runner.num_decode_steps
            for o in eng.step():
                got[o.request_id] += o.choices[0].token_ids
            assert runner.num_decode_steps == before + 1
            now = (buf.ids.data_ptr(), buf.positions.data_ptr(), buf.slot_mapping.data_ptr(),
                   buf.seq_lens.data_ptr(), buf.table_rows.data_ptr(), buf.lora_slots.data_ptr(),
                   runner.tables.data_ptr())
            ptrs = ptrs or now
            assert now == ptrs
    finally:
        runner.decode_forward = real_forward
    assert recorder.ops and "aten.bmm" in recorder.ops  # the forward ran, with LoRA inside
    assert not [op for op in recorder.ops if op in HOST_SYNC_OPS]
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.choices[0].token_ids
    base = hf_generate(hf_model, prompt, 12)
    refs = {n: peft_generate(hf_model, p, prompt, 12) for n, p in adapters.items()}
    assert len({tuple(r) for r in refs.values()} | {tuple(base)}) == 4
    for name, r in zip(names, rids):
        assert got[r] == (base if name is None else refs[name]), name


def test_decode_reads_the_longest_rows_blocks_exactly_unless_graphs_need_buckets(tiny_model_dir):
    runner = _engine(tiny_model_dir).runner
    bs = runner.block_size
    assert runner.use_graphs is False  # the CPU path: no padding beyond the longest row's last block
    assert [runner.context_bucket(n) for n in (1, bs, bs + 1, 5 * bs + 1)] == [1, 1, 2, 6]
    assert runner.context_bucket(10**6) == runner.max_blocks
    runner.use_graphs = True  # with CUDA graphs: power-of-two buckets, at least 4 blocks
    assert [runner.context_bucket(n) for n in (1, bs + 1, 5 * bs + 1, 9 * bs)] == [4, 4, 8, 16]


def test_nan_in_one_slot_leaves_every_other_adapter_unchanged(tiny_model_dir, tokenizer, adapters):
    eng = _engine(tiny_model_dir)
    for name, path in adapters.items():
        eng.add_lora(name, load_peft_adapter(path)[0])
    prompt = tokenizer("Describe the image.").input_ids
    sp = SamplingParams(max_tokens=8, **GREEDY)
    names = ["a1", "a2", None, "a1"]
    clean = eng.generate([prompt] * 4, sp, adapters=names)
    eng.generate([prompt], sp, adapters=["a3"])  # a3 resident in its own slot, now idle
    slot = eng.loras.resident["a3"]
    assert slot not in {eng.loras.resident["a1"], eng.loras.resident["a2"]}
    R = eng.slots.max_rank
    for key in eng.slots.a:  # NaN and inf straight into the slot, past every check
        w = eng.slots.a[key].shape[1] // eng.slots.num_slots
        eng.slots.a[key][:, slot * w:slot * w + R] = float("nan")
        eng.slots.b[key][slot] = float("inf")
    assert eng.generate([prompt] * 4, sp, adapters=names) == clean  # prefill (eager) and decode (static) paths


def test_adapter_that_overflows_in_float16_is_refused(tiny_model_dir, adapters):
    eng = LLMEngine(EngineConfig(str(tiny_model_dir), dtype="float16", block_size=4, num_kv_blocks=16, max_loras=2,
                                 max_lora_rank=8))
    w = load_peft_adapter(adapters["a1"])[0]
    eng.add_lora("fine", w)  # the same adapter at ordinary scale is served
    big = LoRAWeights(w.rank, w.scaling, {k: (a, b * 1e5) for k, (a, b) in w.weights.items()})
    assert all(torch.isfinite(b).all() for _, b in big.weights.values())  # finite in float32 ...
    with pytest.raises(LoRASlotError, match=r"not finite in float16 .*retrain or rescale"):
        eng.add_lora("big", big)  # ... but not in the engine's float16
    assert "big" not in eng.loras.adapters
    nan = LoRAWeights(w.rank, w.scaling, {k: (a.clone(), b) for k, (a, b) in w.weights.items()})
    next(iter(nan.weights.values()))[0][0, 0] = float("nan")
    with pytest.raises(LoRASlotError, match="not finite"):
        eng.add_lora("nan", nan)
