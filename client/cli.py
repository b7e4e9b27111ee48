"""The `vlora` command line: chat, list models, check health, benchmark, make the tiny model,
manage versioned adapters (`vlora adapters list|show|load|delete|rollback|job`), train them
online (`vlora learn NAME --data examples.jsonl`) and sample their training data with optimal
sampling (`vlora generate-data --student A --teacher B --prompts p.jsonl --out data.jsonl`).

Server errors are reported as one `error: <status> <message>` line on stderr with exit code
1, never a traceback: the message is the server's own, which already says what to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time

DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args):
    from vlora.client.client import VloraClient

    return VloraClient(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=args.retries,
                       admin_key=getattr(args, "admin_key", None))


def _describe_error(exc: BaseException, url: str) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        return f"{exc.status_code} {body.get('message') or exc.message}"
    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError: it is a subclass
        return f"request to {url} timed out"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach {url} ({exc.__cause__ or exc})"
    return str(getattr(exc, "message", None) or exc)


# -- chat -------------------------------------------------------------------------------------
def _stream_turn(client, messages: list[dict], args) -> str:
    """Stream one answer to stdout as it arrives; returns the full text for the history."""
    params: dict = {}
    for name in ("max_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.verbose:
        params["stream_options"] = {"include_usage": True}
    stream = client.chat(messages, model=args.model, stream=True, **params)
    pieces: list[str] = []
    info: dict = {}
    with stream:
        for chunk in stream:
            extra = chunk.model_extra or {}
            info.setdefault("model", chunk.model)
            if "adapter_version" in extra:
                info["adapter_version"] = extra["adapter_version"]
            if chunk.usage is not None:
                u = chunk.usage
                info["usage"] = f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens"
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    pieces.append(choice.delta.content)
                    sys.stdout.write(choice.delta.content)
                    sys.stdout.flush()
                if choice.finish_reason:
                    info["finish"] = choice.finish_reason
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose:
        print("[" + ", ".join(f"{k} {v}" for k, v in info.items()) + "]", file=sys.stderr)
    return "".join(pieces)


def _cmd_chat(args) -> int:
    from vlora.client.client import user_message

    client = _client(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        _stream_turn(client, [*history, user_message(args.prompt, args.image)], args)
        return 0

    # Interactive: images attach to the first turn; an error drops that turn and goes on.
    images, status = list(args.image), 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return status
        turn = user_message(line.strip(), images)
        try:
            answer = _stream_turn(client, [*history, turn], args)
        except Exception as exc:
            import openai

            if not isinstance(exc, openai.APIError):
                raise
            print(f"error: {_describe_error(exc, args.url)}", file=sys.stderr)
            status = 1
            continue
        history += [turn, {"role": "assistant", "content": answer}]
        images = []


# -- models / health -------------------------------------------------------------------------
def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cmd_models(args) -> int:
    models = _client(args).models()
    with_version = any(m.get("version") is not None for m in models)
    header = ["ID", "PARENT"] + (["VERSION"] if with_version else [])
    rows = [header]
    for m in models:
        row = [m["id"], m.get("parent") or "-"]
        if with_version:
            row.append("-" if m.get("version") is None else str(m["version"]))
        rows.append(row)
    print(_table(rows))
    return 0


def _cmd_health(args) -> int:
    h = _client(args).health()
    print(f"{h.get('status', '?')}  model {h.get('model', '?')}")
    for name, state in (h.get("deployments") or {}).items():
        print(f"  {name:16} {state}")
    return 0 if h.get("status") == "ok" else 1


# -- bench -----------------------------------------------------------------------------------
def _cmd_bench(args) -> int:
    from vlora.client.loadgen import BenchConfig, LoadGenerator, format_report, summarize

    adapters = [a.strip() for a in (args.adapters or "").split(",") if a.strip()]
    cfg = BenchConfig(concurrency=args.concurrency, requests=args.requests, adapters=adapters,
                      image_share=args.image_share, image_size=args.image_size, max_tokens=args.max_tokens,
                      prompt_words=args.prompt_words, duration_s=args.duration_s,
                      temperature=args.temperature, ignore_eos=args.ignore_eos, seed=args.seed)
    client = _client(args)
    models = [args.model or client.base_model(), *adapters]
    # No retries: a retried request would hide a failure and double-count its latency.
    aclient = client.async_openai(max_retries=0)

    async def go():
        try:
            return await LoadGenerator(aclient, models, cfg).run(progress=None if args.progress else False)
        finally:
            await aclient.close()

    results, sent, wall = asyncio.run(go())
    summary = summarize(results, sent, wall, cfg, models, client.base_url)
    print(format_report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"  wrote {args.json}")
    return 0 if summary["failures"] == 0 and summary["successes"] > 0 else 1


# -- adapters --------------------------------------------------------------------------------
def _when(created) -> str:
    if created is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(created)))


def _opt(value) -> str:
    return "-" if value is None else str(value)


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _cmd_adapters_list(args) -> int:
    adapters = _client(args).adapters()
    if not adapters:
        print("no adapters")
        return 0
    rows = [["NAME", "VERSION", "ORIGIN", "PARENT", "RANK", "CREATED"]]
    for a in adapters:
        rows.append([a["name"], str(a["version"]), _opt(a.get("origin")), _opt(a.get("parent_version")),
                     _opt(a.get("rank")), _when(a.get("created"))])
    print(_table(rows))
    return 0


def _cmd_adapters_show(args) -> int:
    info = _client(args).adapter(args.name)
    versions = info.get("versions") or []
    current = info.get("current")
    print(f"{info.get('name', args.name)}: current version {_opt(current)}, {len(versions)} retained")
    if not versions:
        return 0
    rows = [["", "VERSION", "ORIGIN", "PARENT", "RANK", "ALPHA", "CREATED", "LOSS", "CHECKSUM", "SOURCE"]]
    for v in versions:
        m = v.get("metrics") or {}
        loss = f"{_num(m['loss_before'])}->{_num(m['loss_after'])}" if "loss_after" in m else "-"
        rows.append(["*" if v["version"] == current else "", str(v["version"]), _opt(v.get("origin")),
                     _opt(v.get("parent_version")), _opt(v.get("rank")), _num(v.get("lora_alpha")),
                     _when(v.get("created")), loss, (v.get("checksum") or "-")[:12], _opt(v.get("source"))])
    print(_table(rows))
    return 0


def _cmd_adapters_load(args) -> int:
    # a folder given relative to here is sent absolute (the server resolves nothing against its own cwd);
    # URIs (s3://, memory://, ...) and paths that exist only on the server go as typed
    path = os.path.abspath(args.path) if "://" not in args.path and os.path.isdir(args.path) else args.path
    info = _client(args).load_adapter(args.name, path)
    synced = info.get("replicas_synced")
    print(f"loaded {info.get('name', args.name)} version {info['version']} (rank {_opt(info.get('rank'))}"
          + (f", synced to {synced} replicas)" if synced is not None else ")"))
    return 0


def _cmd_adapters_delete(args) -> int:
    _client(args).delete_adapter(args.name)
    print(f"deleted {args.name}")
    return 0


def _cmd_adapters_rollback(args) -> int:
    info = _client(args).rollback_adapter(args.name, args.version)
    print(f"rolled back {info.get('name', args.name)}: version {info['version']} is a copy of version "
          f"{_opt(info.get('parent_version'))}")
    return 0


def _cmd_adapters_job(args) -> int:
    job = _client(args).job(args.name, args.job_id)
    print(json.dumps(job, indent=2))
    return 0 if job.get("status") != "failed" else 1


# -- learn -----------------------------------------------------------------------------------
SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """One character per value (averaged into `width` buckets when there are more), scaled
    between the finite min and max; non-finite values are shown as `×`."""
    vals = [float(v) for v in values]
    if len(vals) > width:  # bucket means, so a long run still fits one line
        buckets = [vals[i * len(vals) // width:(i + 1) * len(vals) // width] for i in range(width)]
        vals = [sum(b) / len(b) for b in buckets]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return "×" * len(vals)
    lo, hi = min(finite), max(finite)
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append("×")
        elif hi == lo:
            out.append(SPARK[len(SPARK) // 2])
        else:
            out.append(SPARK[round((v - lo) / (hi - lo) * (len(SPARK) - 1))])
    return "".join(out)


def _cmd_learn(args) -> int:
    from vlora.client.client import load_examples

    examples = load_examples(args.data, args.image_dir)  # before anything is sent: bad data sends nothing
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    params = dict(steps=args.steps, learning_rate=args.lr, rank=args.rank, lora_alpha=args.alpha,
                  target_modules=targets, use_rslora=True if args.rslora else None)
    client = _client(args)
    if not args.wait:
        job = client.learn(args.name, examples, wait=False, **params)
        print(f"submitted {job.get('id')} for {args.name} ({len(examples)} examples, {job.get('steps')} steps); "
              f"check it with: vlora adapters job {args.name} {job.get('id')}")
        return 0

    from tqdm import tqdm

    bar = tqdm(total=args.steps, unit="step", desc=f"learn {args.name}", file=sys.stderr,
               disable=None if args.progress else True)
    seen: dict = {}

    def on_progress(job: dict) -> None:
        seen["job"] = job
        if job.get("steps") is not None and bar.total != job["steps"]:
            bar.total = job["steps"]
        step = int(job.get("step") or 0)
        if step > bar.n:
            bar.update(step - bar.n)
        losses = job.get("losses") or []
        bar.set_postfix_str(f"{job.get('status')}" + (f" loss {losses[-1]:.4f}" if losses else ""), refresh=False)
        bar.refresh()

    try:
        job = client.learn(args.name, examples, poll_s=args.poll_s, on_progress=on_progress, **params)
    except KeyboardInterrupt:
        bar.close()
        j = seen.get("job")
        if j and j.get("id"):
            print(f"interrupted; job {j['id']} keeps running on the server "
                  f"(vlora adapters job {args.name} {j['id']})", file=sys.stderr)
        raise
    finally:
        bar.close()
    r = job.get("result") or {}
    print(f"loss {_num(r.get('loss_before'))} -> {_num(r.get('loss_after'))} "
          f"({_opt(r.get('steps'))} steps, {_opt(r.get('num_examples'))} examples"
          + (f", {r['seconds']:.1f} s)" if isinstance(r.get("seconds"), (int, float)) else ")"))
    parent = r.get("parent_version")
    synced = r.get("replicas_synced")
    print(f"{r.get('adapter', args.name)} version {_opt(r.get('version'))}"
          + (f" (from version {parent})" if parent is not None else " (new adapter)")
          + (f", synced to {synced} replicas" if synced is not None else ""))
    losses = [x for x in (job.get("losses") or []) if isinstance(x, (int, float))]
    if losses:
        print(f"loss curve {sparkline(losses)}  first {_num(losses[0])}  min {_num(min(losses))}  "
              f"last {_num(losses[-1])}")
    return 0


# -- generate-data ---------------------------------------------------------------------------
def _cmd_generate_data(args) -> int:
    from vlora.client.datagen import DatagenConfig, format_summary, generate_data, load_prompts

    cfg = DatagenConfig(student=args.student, teacher=args.teacher, concurrency=args.concurrency,
                        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                        alpha_method=args.alpha_method, fixed_alpha=args.fixed_alpha, alpha_min=args.alpha_min,
                        alpha_max=args.alpha_max, teacher_top_k=args.teacher_top_k, teacher_top_p=args.teacher_top_p,
                        samples_per_prompt=args.samples_per_prompt)
    prompts = load_prompts(args.prompts, args.image_dir)  # before anything is sent: a bad line sends nothing
    summary = generate_data(_client(args), prompts, args.out, cfg, progress=None if args.progress else False)
    print(format_summary(summary))
    return 0 if summary["failed"] == 0 and summary["written"] > 0 else 1


# -- tiny-model ------------------------------------------------------------------------------
def _cmd_tiny_model(args) -> int:
    from vlora.engine.tiny import write_tiny_model

    out = write_tiny_model(args.dir, seed=args.seed)
    print(f"wrote tiny Qwen2.5-VL checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlora", description="vlora: Qwen2.5-VL with online-learned LoRA adapters on Ray Serve")
    p.add_argument("--url", default=os.environ.get("VLORA_URL", DEFAULT_URL),
                   help="server address (env VLORA_URL; default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("VLORA_API_KEY"),
                   help="API key sent as a Bearer token (env VLORA_API_KEY)")
    p.add_argument("--admin-key", default=os.environ.get("VLORA_ADMIN_KEY"),
                   help="admin key for the adapter routes (env VLORA_ADMIN_KEY; default: the API key)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--retries", type=int, default=2,
                   help="retries on connection errors, 429 and 5xx (the SDK's backoff; bench never retries)")
    # The same options after the subcommand too (`vlora chat --url ...`); SUPPRESS keeps the
    # top-level value when they are not repeated there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--api-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--admin-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--retries", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("chat", parents=[common], help="chat with the base model or an adapter, streaming the answer")
    c.add_argument("prompt", nargs="?", help="one question; without it, an interactive chat on stdin")
    c.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL",
                   help="attach an image (local file or http(s) URL); repeatable")
    c.add_argument("--model", help="base model or adapter name (default: the base model)")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--temperature", type=float)
    c.add_argument("--seed", type=int)
    c.add_argument("-v", "--verbose", action="store_true",
                   help="after the answer, print model, adapter version, finish reason and usage to stderr")
    c.set_defaults(func=_cmd_chat)

    m = sub.add_parser("models", parents=[common], help="list the base model and the adapters")
    m.set_defaults(func=_cmd_models)

    h = sub.add_parser("health", parents=[common], help="check the server and its deployments (exit 1 unless ok)")
    h.set_defaults(func=_cmd_health)

    b = sub.add_parser("bench", parents=[common], help="load-test the server with concurrent streaming chat requests")
    b.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    b.add_argument("--requests", type=int, default=64, help="requests to send in all")
    b.add_argument("--duration-s", type=float, default=300.0,
                   help="stop after this many seconds even if requests remain (in-flight ones are cancelled)")
    b.add_argument("--adapters", help="comma-separated adapters to mix in round-robin with the base model")
    b.add_argument("--model", help="base model (default: from /v1/models)")
    b.add_argument("--image-share", type=float, default=0.3, help="share of requests carrying a noise image")
    b.add_argument("--image-size", type=int, default=224, help="side of the square noise image in pixels")
    b.add_argument("--max-tokens", type=int, default=32)
    b.add_argument("--prompt-words", type=int, default=20)
    b.add_argument("--temperature", type=float)
    b.add_argument("--ignore-eos", action="store_true", help="always generate max-tokens (vLLM-style extra)")
    b.add_argument("--seed", type=int, default=0, help="seed for prompts, images and which requests get one")
    b.add_argument("--json", metavar="OUT", help="write the full report (with per-request records) here")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    b.set_defaults(func=_cmd_bench)

    a = sub.add_parser("adapters", parents=[common], help="list, inspect, load, delete and roll back adapters (admin)")
    asub = a.add_subparsers(dest="adapters_command")
    a.set_defaults(func=_cmd_adapters_list)  # plain `vlora adapters` lists them
    al = asub.add_parser("list", parents=[common], help="the current version of every adapter")
    al.set_defaults(func=_cmd_adapters_list)
    ash = asub.add_parser("show", parents=[common], help="an adapter's retained versions (* = current)")
    ash.add_argument("name")
    ash.set_defaults(func=_cmd_adapters_show)
    ald = asub.add_parser("load", parents=[common], help="publish a PEFT adapter folder as the next version")
    ald.add_argument("name")
    ald.add_argument("path", help="the adapter folder on the SERVER's disk (inside its adapter_load_dirs)")
    ald.set_defaults(func=_cmd_adapters_load)
    adl = asub.add_parser("delete", parents=[common], help="remove an adapter and all its versions")
    adl.add_argument("name")
    adl.set_defaults(func=_cmd_adapters_delete)
    arb = asub.add_parser("rollback", parents=[common],
                          help="publish a copy of an older version as a new version")
    arb.add_argument("name")
    arb.add_argument("--version", type=int, help="the version to copy (default: the one before the current)")
    arb.set_defaults(func=_cmd_adapters_rollback)
    aj = asub.add_parser("job", parents=[common], help="show a learn job as JSON (exit 1 if it failed)")
    aj.add_argument("name")
    aj.add_argument("job_id")
    aj.set_defaults(func=_cmd_adapters_job)

    lr = sub.add_parser("learn", parents=[common], help="train an adapter online on JSONL examples (admin)")
    lr.add_argument("name", help="adapter to train (created when new; else trained from its current version)")
    lr.add_argument("--data", required=True, metavar="JSONL",
                    help='one {"messages": [...]} or {"prompt": ..., "output": "..."} object per line')
    lr.add_argument("--image-dir", metavar="DIR",
                    help="folder for relative local image paths (default: the JSONL file's folder)")
    lr.add_argument("--steps", type=int, default=20)
    lr.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    lr.add_argument("--rank", type=int, default=8, help="LoRA rank of a new adapter")
    lr.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha of a new adapter")
    lr.add_argument("--targets", metavar="MODULES", help="comma-separated target modules, e.g. q_proj,v_proj "
                    "(default: the server's)")
    lr.add_argument("--rslora", action="store_true", help="rank-stabilised scaling for a new adapter")
    lr.add_argument("--poll-s", type=float, default=0.5, help="seconds between job polls")
    lr.add_argument("--no-wait", dest="wait", action="store_false",
                    help="submit the job, print its id and return")
    lr.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    lr.set_defaults(func=_cmd_learn)

    g = sub.add_parser("generate-data", parents=[common],
                       help="sample training data with optimal sampling (a student steered by a teacher)")
    g.add_argument("--student", required=True, help="the model that samples (base model or adapter name)")
    g.add_argument("--teacher", required=True, help="the steering policy: 'base' or an adapter name")
    g.add_argument("--prompts", required=True, metavar="JSONL",
                   help='one {"messages": [...]} or {"prompt": "text"} object per line, optionally with '
                        '"teacher_messages" / "teacher_prompt" (the teacher\'s own prompt)')
    g.add_argument("--out", required=True, metavar="JSONL",
                   help='output: one {"prompt": [...], "output": "...", diagnostics...} line per sample, '
                        "in prompt order (the format `vlora learn --data` reads)")
    g.add_argument("--image-dir", metavar="DIR",
                   help="folder for relative local image paths (default: the prompts file's folder)")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    g.add_argument("--samples-per-prompt", type=int, default=1)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="sample k (in output order) is sent seed + k")
    g.add_argument("--alpha-method", default="kl_symmetry",
                   choices=["fixed", "kl_symmetry", "reverse_kl_symmetry", "ess_balance", "entropy"],
                   help="how the teacher's weight alpha is chosen per token (default %(default)s)")
    g.add_argument("--fixed-alpha", type=float, default=0.5, help="alpha for --alpha-method fixed")
    g.add_argument("--alpha-min", type=float, default=0.0, help="lower clamp of a solved alpha")
    g.add_argument("--alpha-max", type=float, default=1.0, help="upper clamp of a solved alpha")
    g.add_argument("--teacher-top-k", type=int, default=0, help="restrict sampling to the teacher's top k (0 = off)")
    g.add_argument("--teacher-top-p", type=float, default=1.0, help="restrict sampling to the teacher's top-p nucleus")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.set_defaults(func=_cmd_generate_data)

    t = sub.add_parser("tiny-model", help="write the embedded tiny random-weight Qwen2.5-VL checkpoint")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_tiny_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import httpx
    import openai

    from vlora.client.client import VloraAPIError

    try:
        return args.func(args)
    except VloraAPIError as exc:
        print(f"error: {exc.status} {exc.message}", file=sys.stderr)
        return 1
    except openai.APIError as exc:
        print(f"error: {_describe_error(exc, args.url)}", file=sys.stderr)
        return 1
    except httpx.TimeoutException:
        print(f"error: request to {args.url} timed out", file=sys.stderr)
        return 1
    except httpx.TransportError as exc:
        print(f"error: cannot reach {args.url} ({exc})", file=sys.stderr)
        return 1
    except httpx.HTTPStatusError as exc:
        print(f"error: {exc.response.status_code} {exc.response.text.strip()}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, OSError, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
