"""The `vlora` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_tiny_model(args) -> int:
    from engine.tiny import write_tiny_model

    out = write_tiny_model(args.dir, seed=args.seed)
    print(f"wrote tiny Qwen2.5-VL checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlora", description="vlora: Qwen2.5-VL with online-learned LoRA adapters on Ray Serve")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tiny-model", help="write the embedded tiny random-weight Qwen2.5-VL checkpoint")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_tiny_model)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
