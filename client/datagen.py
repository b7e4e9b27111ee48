"""`vlora generate-data`: sample training data with optimal sampling (a student drafts, a teacher
steers; the math is in the server's `engine/optimal_sampling.py`).

Each prompt of a JSONL file goes to `/v1/chat/completions` with the student as `model` and an
`optimal_sampling` body field naming the teacher and the alpha method, asking for per-token
diagnostics. Every answer becomes one JSONL line in prompt order:

    {"prompt": [messages as sent], "output": text, "student", "teacher", "alpha_method",
     "mean_alpha", "mean_ess_ratio", "ess_student", "ess_teacher", "num_tokens", "finish_reason",
     "logprobs": {"student": [...], "teacher": [...], "q": [...]}, "token_ids": [...],
     "prompt_index", "sample_index"[, "teacher_messages"]}

which is the `{"prompt": [...], "output": "..."}` record `vlora learn --data` reads, so the two
commands close the loop. The per-token log-probabilities under p_s, p_t and q are what importance
weights p/q need. Requests that fail (or come back without diagnostics) are counted, not written.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import openai

from vlora.client.client import prompt_messages, read_jsonl
from vlora.client.loadgen import _error_key

ALPHA_METHODS = ("fixed", "kl_symmetry", "reverse_kl_symmetry", "ess_balance", "entropy")


@dataclass
class DatagenConfig:
    """What one `generate-data` run asks the server for (written into nothing; printed in the summary)."""

    student: str
    teacher: str
    concurrency: int = 8
    max_tokens: int = 64
    temperature: float = 1.0
    seed: int | None = None  # sample k (in output order) gets seed + k, so samples of one prompt differ
    alpha_method: str = "kl_symmetry"
    fixed_alpha: float = 0.5
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    teacher_top_k: int = 0
    teacher_top_p: float = 1.0
    samples_per_prompt: int = 1

    def __post_init__(self):
        if not self.student or not self.teacher:
            raise ValueError("--student and --teacher must name models (the teacher may be 'base')")
        if self.alpha_method not in ALPHA_METHODS:
            raise ValueError(f"alpha method must be one of {', '.join(ALPHA_METHODS)}, got {self.alpha_method!r}")
        if self.concurrency < 1 or self.samples_per_prompt < 1 or self.max_tokens < 1:
            raise ValueError("concurrency, samples per prompt and max tokens must be >= 1")
        if not 0.0 <= self.alpha_min <= self.alpha_max <= 1.0:
            raise ValueError(f"need 0 <= alpha min <= alpha max <= 1, got {self.alpha_min} and {self.alpha_max}")
        if self.teacher_top_k < 0 or not 0.0 < self.teacher_top_p <= 1.0:
            raise ValueError("teacher top-k must be >= 0 (0 = off) and teacher top-p within (0, 1]")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def optimal_sampling(self, teacher_messages: list | None = None) -> dict:
        """The request's `optimal_sampling` body field."""
        body = {"teacher": self.teacher, "alpha_method": self.alpha_method, "fixed_alpha": self.fixed_alpha,
                "alpha_min": self.alpha_min, "alpha_max": self.alpha_max, "teacher_top_k": self.teacher_top_k,
                "teacher_top_p": self.teacher_top_p, "return_diagnostics": True}
        if teacher_messages is not None:
            body["teacher_messages"] = teacher_messages
        return body


# -- prompts ---------------------------------------------------------------------------------------
def prompt_from_record(record: Any, base_dir: str | os.PathLike = ".") -> dict:
    """`{"messages": [...], "teacher_messages": [...] | None}` from one prompts-file record:
    `{"messages": [...]}` or `{"prompt": "text" | [...], "images": [...]}` (the learn format's
    prompt; an `output` is ignored), optionally with `teacher_messages` (a list) or
    `teacher_prompt` (a string: one user turn, or a list) for the teacher's own prompt. Local
    image paths become data URLs. Raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise ValueError("'messages' must be a non-empty list of chat messages")
        messages = prompt_messages(record["messages"], None, base_dir, "messages")
    elif "prompt" in record:
        messages = prompt_messages(record["prompt"], record.get("images"), base_dir, "prompt")
    else:
        raise ValueError('missing "messages" or "prompt" (expected {"messages": [...]} or {"prompt": "text"})')
    if "teacher_messages" in record and "teacher_prompt" in record:
        raise ValueError("give 'teacher_messages' or 'teacher_prompt', not both")
    teacher = None
    if "teacher_messages" in record:
        if not isinstance(record["teacher_messages"], list) or not record["teacher_messages"]:
            raise ValueError("'teacher_messages' must be a non-empty list of chat messages")
        teacher = prompt_messages(record["teacher_messages"], None, base_dir, "teacher_messages")
    elif "teacher_prompt" in record:
        teacher = prompt_messages(record["teacher_prompt"], None, base_dir, "teacher_prompt")
    return {"messages": messages, "teacher_messages": teacher}


def load_prompts(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every prompt of a JSONL file (see `prompt_from_record`), checked before anything is sent."""
    return read_jsonl(path, prompt_from_record, "prompts", image_dir)


# -- one sample ------------------------------------------------------------------------------------
class NoDiagnostics(Exception):
    """The server answered without `optimal_sampling` diagnostics (it ignored the field)."""


def _mean(values: list) -> float | None:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else None


def record_from_response(resp: Any, prompt: dict, cfg: DatagenConfig, prompt_index: int,
                         sample_index: int) -> dict:
    """The output line for one chat completion (its first choice)."""
    if not resp.choices:
        raise NoDiagnostics("the response has no choices")
    choice = resp.choices[0]
    extra = choice.model_extra or {}
    osd = extra.get("optimal_sampling")
    if not isinstance(osd, dict) or not isinstance(osd.get("diagnostics"), list):
        raise NoDiagnostics("the response has no optimal_sampling diagnostics (does the server support "
                            "optimal sampling?)")
    diags = [d for d in osd["diagnostics"] if isinstance(d, dict)]

    def col(name: str) -> list:
        return [d.get(name) for d in diags]

    mean_alpha = osd.get("mean_alpha")
    mean_ess_ratio = osd.get("mean_ess_ratio")
    usage = getattr(resp, "usage", None)
    record = {
        "prompt": prompt["messages"],
        "output": (choice.message.content if choice.message is not None else None) or "",
        "student": cfg.student,
        "teacher": cfg.teacher,
        "alpha_method": cfg.alpha_method,
        "mean_alpha": mean_alpha if isinstance(mean_alpha, (int, float)) else _mean(col("alpha")),
        "mean_ess_ratio": mean_ess_ratio if isinstance(mean_ess_ratio, (int, float)) else _mean(col("ess_ratio")),
        "ess_student": _mean(col("ess_student")),
        "ess_teacher": _mean(col("ess_teacher")),
        "num_tokens": len(diags) if diags or usage is None else usage.completion_tokens,
        "finish_reason": choice.finish_reason,
        "logprobs": {"student": col("logprob_student"), "teacher": col("logprob_teacher"), "q": col("logprob_q")},
        "token_ids": col("token_id"),
        "prompt_index": prompt_index,
        "sample_index": sample_index,
    }
    if prompt.get("teacher_messages") is not None:
        record["teacher_messages"] = prompt["teacher_messages"]
    # Kept out of the file, for the run's per-token means.
    record["_alphas"], record["_ess_ratios"] = col("alpha"), col("ess_ratio")
    return record


# -- the run ---------------------------------------------------------------------------------------
async def run_datagen(client: openai.AsyncOpenAI, prompts: list[dict], cfg: DatagenConfig, out: IO[str],
                      progress: bool | None = None) -> dict:
    """Sample every prompt `cfg.samples_per_prompt` times with at most `cfg.concurrency` requests in
    flight, writing each sample's line to `out` as soon as all before it are done (so the file is
    in prompt order and a stopped run leaves a valid prefix). Returns the summary dict.
    `progress=None` shows the bar only on a terminal."""
    from tqdm import tqdm

    jobs = [(i, j) for i in range(len(prompts)) for j in range(cfg.samples_per_prompt)]
    done: dict[int, dict | None] = {}
    next_job = next_write = 0
    written = 0
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    alphas: list = []
    ratios: list = []
    tokens = 0
    bar = tqdm(total=len(jobs), unit="sample", desc="generate-data", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress is None else not progress)

    async def one(k: int) -> dict | None:
        i, j = jobs[k]
        prompt = prompts[i]
        kw: dict = dict(model=cfg.student, messages=prompt["messages"], max_tokens=cfg.max_tokens,
                        temperature=cfg.temperature,
                        extra_body={"optimal_sampling": cfg.optimal_sampling(prompt["teacher_messages"])})
        if cfg.seed is not None:
            kw["seed"] = cfg.seed + k
        try:
            resp = await client.chat.completions.create(**kw)
            return record_from_response(resp, prompt, cfg, i, j)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
            key, message = ("no_diagnostics", str(exc)) if isinstance(exc, NoDiagnostics) else _error_key(exc)
            failures[key] += 1
            examples.setdefault(key, message)
            return None

    def flush() -> None:
        nonlocal next_write, written, tokens
        while next_write in done:
            rec = done.pop(next_write)
            next_write += 1
            if rec is None:
                continue
            a, r = rec.pop("_alphas"), rec.pop("_ess_ratios")
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += 1
            alphas.extend(a)
            ratios.extend(r)
            tokens += rec["num_tokens"] or 0
        out.flush()

    async def worker():
        nonlocal next_job
        while next_job < len(jobs):
            k = next_job
            next_job += 1
            done[k] = await one(k)
            flush()
            bar.update(1)
            mean_alpha = _mean(alphas)
            bar.set_postfix_str((f"alpha {mean_alpha:.3f}" if mean_alpha is not None else "")
                                + (f" errors {sum(failures.values())}" if failures else ""), refresh=False)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(jobs)))))
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    return {
        "prompts": len(prompts),
        "samples_planned": len(jobs),
        "written": written,
        "failed": sum(failures.values()),
        "errors": dict(failures),
        "error_examples": examples,
        "tokens": tokens,
        "mean_alpha": _mean(alphas),  # over every token written
        "mean_ess_ratio": _mean(ratios),
        "duration_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "samples_per_s": written / wall if wall > 0 else 0.0,
        "config": asdict(cfg),
    }


def generate_data(client: Any, prompts: list[dict], out: str | os.PathLike, cfg: DatagenConfig,
                  progress: bool | None = False) -> dict:
    """Run `run_datagen` for a `VloraClient` (its URL, key, timeout and retries), writing `out`.
    Returns the summary dict (`format_summary` prints it)."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)

    async def go():
        aclient = client.async_openai()
        try:
            with open(out, "w", encoding="utf-8") as f:
                return await run_datagen(aclient, prompts, cfg, f, progress=progress)
        finally:
            await aclient.close()

    summary = asyncio.run(go())
    summary["url"] = client.base_url
    summary["out"] = os.fspath(out)
    return summary


def _f(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def format_summary(s: dict) -> str:
    """The human summary of a run."""
    c = s["config"]
    lines = [
        f"vlora generate-data -> {s.get('url', '?')}",
        f"  models       student {c['student']}, teacher {c['teacher']}, alpha {c['alpha_method']}",
        f"  samples      {s['written']} written to {s.get('out', '?')}, {s['failed']} failed "
        f"({s['prompts']} prompts x {c['samples_per_prompt']}) in {s['duration_s']:.2f} s",
        f"  tokens       {s['tokens']} ({s['tokens_per_s']:.1f} tok/s, {s['samples_per_s']:.2f} samples/s)",
        f"  mean alpha   {_f(s['mean_alpha'])}   mean ESS ratio {_f(s['mean_ess_ratio'])}   (per token)",
    ]
    for j, (key, n) in enumerate(sorted(s["errors"].items())):
        lines.append(f"  {'errors' if j == 0 else '':12} {key} x{n}: {s['error_examples'][key]}")
    return "\n".join(lines)
