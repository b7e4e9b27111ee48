"""The `vlora` command line: chat, list models, check health, benchmark, make the tiny model.

Server errors are reported as one `error: <status> <message>` line on stderr with exit code
1, never a traceback: the message is the server's own, which already says what to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args):
    from client.client import VloraClient

    return VloraClient(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=args.retries)


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
    from client.client import user_message

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
    from client.loadgen import BenchConfig, LoadGenerator, format_report, summarize

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


# -- tiny-model ------------------------------------------------------------------------------
def _cmd_tiny_model(args) -> int:
    from engine.tiny import write_tiny_model

    out = write_tiny_model(args.dir, seed=args.seed)
    print(f"wrote tiny Qwen2.5-VL checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlora", description="vlora: Qwen2.5-VL with online-learned LoRA adapters on Ray Serve")
    p.add_argument("--url", default=os.environ.get("VLORA_URL", DEFAULT_URL),
                   help="server address (env VLORA_URL; default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("VLORA_API_KEY"),
                   help="API key sent as a Bearer token (env VLORA_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--retries", type=int, default=2,
                   help="retries on connection errors, 429 and 5xx (the SDK's backoff; bench never retries)")
    # The same options after the subcommand too (`vlora chat --url ...`); SUPPRESS keeps the
    # top-level value when they are not repeated there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--api-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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

    t = sub.add_parser("tiny-model", help="write the embedded tiny random-weight Qwen2.5-VL checkpoint")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_tiny_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import httpx
    import openai

    try:
        return args.func(args)
    except openai.APIError as exc:
        print(f"error: {_describe_error(exc, args.url)}", file=sys.stderr)
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
