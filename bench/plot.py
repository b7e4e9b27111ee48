"""Charts from recorded benchmark runs: throughput, TTFT percentiles, adapter publish-to-served.

    python bench/plot.py RUN.json [RUN.json | DIR ...] [--out bench/plots]

Reads the JSON files the benchmarks write (a directory means every *.json in it; no argument
means bench/results/) and tells them apart by their keys:

- `bench/engine.py --json`: decode tok/s per batch for the engine and HF `generate`, the
  mixed-adapter batch (engine and PEFT), single-request TTFT;
- `vlora bench --json` (client/loadgen.py): one load run; several runs at different
  concurrencies make a curve, split by the models they spread requests over;
- `bench/serve.py --json`: the concurrency sweep through HTTP (1 and 2 Decoder replicas) beside
  the engine alone;
- `bench/adapters.py --json`: base vs 8 adapters (with and without live version swaps) at one
  concurrency, publish-to-served latency and learn-call latency.

Writes bench/plots/throughput.png, ttft.png and adapters.png; a chart whose inputs are missing
is left out (and said so), a file of an unknown shape is skipped. Needs matplotlib
(`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PERCENTILES = ("p50", "p90", "p99")
STYLES = {"p50": "-", "p90": "--", "p99": ":"}


# -- loading -----------------------------------------------------------------------------------------
def kind_of(d: dict) -> str | None:
    if not isinstance(d, dict):
        return None
    if "decode" in d and "meta" in d:
        return "engine"
    if "grid" in (d.get("after") or {}):
        return "serve_path"
    if "sweep" in d and "sequential" in d:
        return "serve"
    if "publish" in d or "conditions" in (d.get("throughput") or {}):
        return "adapters"
    if {"output_tokens_per_s", "concurrency", "per_model"} <= set(d):
        return "loadgen"
    return None


def load(paths: list[Path]) -> dict[str, list[tuple[str, dict]]]:
    """{kind: [(label, data)]} for every readable run; unknown or broken files are reported and skipped."""
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    runs: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skip {f}: {e}", file=sys.stderr)
            continue
        k = kind_of(d)
        if k is None:
            print(f"skip {f}: not a bench/engine.py, serve.py, adapters.py or `vlora bench` JSON", file=sys.stderr)
            continue
        runs[k].append((f.stem, d))
    return runs


def device(d: dict) -> str:
    """The machine a run names (`vlora bench` runs name none: their server's URL instead)."""
    m = d.get("meta") or d.get("machine") or {}
    name = m.get("device_name") or m.get("device") or d.get("url") or "machine not recorded"
    if name == "cpu" and m.get("cpu"):
        name = f"{m['cpu']} CPU"
    return name


def label(stem: str, d: dict, many: bool) -> str:
    return f"{stem} ({device(d)})" if many else device(d)


def ms(x):
    return None if x is None else x * 1e3


def replicas(app: str) -> str:
    """bench/serve.py names its apps r1, r2, ... after their Decoder replica count."""
    n = app[1:] if app.startswith("r") and app[1:].isdigit() else None
    return app if n is None else f"{n} Decoder replica" + ("" if n == "1" else "s")


def log_x(ax, values, base: int = 2) -> None:
    """A log x axis ticked at the measured values, written as plain numbers."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log", base=base)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(values))))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


# -- charts ------------------------------------------------------------------------------------------------
def plot_throughput(plt, runs, out: Path) -> Path | None:
    panels = []
    if runs.get("engine"):
        panels.append(("engine", _engine_throughput))
    if runs.get("serve") or runs.get("loadgen"):
        panels.append(("http", _http_throughput))
    if any((d.get("throughput") or {}).get("conditions") for _, d in runs.get("adapters", [])):
        panels.append(("adapters", _adapter_throughput))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (_, fn) in zip(axes[0], panels):
        fn(ax, runs)
    fig.suptitle("Throughput: base model vs mixed LoRA adapters vs HF baseline", fontsize=13)
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _engine_throughput(ax, runs) -> None:
    many = len(runs["engine"]) > 1
    for stem, d in runs["engine"]:
        sfx = f" [{label(stem, d, many)}]" if many else ""
        rows = d["decode"]
        b = [r["batch"] for r in rows]
        c = ax.plot(b, [r["vlora"]["decode_tok_s"] for r in rows], "o-",
                    label=f"vlora engine, base{sfx}")[0].get_color()
        hf = [(r["batch"], r["hf"]["decode_tok_s"]) for r in rows if r.get("hf")]
        if hf:
            ax.plot(*zip(*hf), "s--", color=c if many else "tab:gray", label=f"HF generate{sfx}")
        mix = d.get("mixed_adapters") or {}
        n = mix.get("adapters")
        if mix.get("vlora"):
            ax.plot([mix["batch"]], [mix["vlora"]["mixed"]["decode_tok_s"]], "D", ms=9,
                    color=c if many else "tab:orange", label=f"vlora, {n} adapters mixed{sfx}")
        if mix.get("peft"):
            ax.plot([mix["batch"]], [mix["peft"]["mixed"]["decode_tok_s"]], "X", ms=10,
                    color=c if many else "tab:red", label=f"HF+PEFT, {n} adapters mixed{sfx}")
    log_x(ax, [r["batch"] for _, d in runs["engine"] for r in d["decode"]])
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("decode tokens/s (steady state)")
    d = runs["engine"][0][1]
    where = "runs as labelled" if many else f"{device(d)}, {d['meta'].get('dtype', '')}"
    ax.set_title(f"Engine alone: {d['meta'].get('model', '')}\n{where}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def _loadgen_series(runs) -> dict[str, list[dict]]:
    """loadgen runs grouped by the models they spread over: 'base' or 'N adapters (+ base)'."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for stem, d in runs.get("loadgen", []):
        adapters = (d.get("config") or {}).get("adapters") or []
        key = "base" if not adapters else f"{len(adapters)} adapters" + (" + base" if len(d["models"]) > len(adapters)
                                                                          else "")
        groups[f"vlora bench, {key}"].append(d)
    return {k: sorted(v, key=lambda d: d["concurrency"]) for k, v in groups.items()}


def _http_throughput(ax, runs) -> None:
    many = len(runs.get("serve", [])) > 1
    for stem, d in runs.get("serve", []):
        rows = sorted(d["sweep"], key=lambda r: r["concurrency"])
        c = [r["concurrency"] for r in rows]
        sfx = f" [{stem}]" if many else ""
        ax.plot(c, [r["engine"]["output_tokens_per_s"] for r in rows], "s--", color="tab:gray",
                label=f"engine alone, same prompts{sfx}")
        for app in rows[0]["http"]:
            ax.plot(c, [r["http"][app]["output_tokens_per_s"] for r in rows], "o-",
                    label=f"HTTP, {replicas(app)}{sfx}")
    for key, ds in _loadgen_series(runs).items():
        ax.plot([d["concurrency"] for d in ds], [d["output_tokens_per_s"] for d in ds], "^-", label=key)
    log_x(ax, _concurrencies(runs))
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    src = (runs.get("serve") or runs.get("loadgen"))[0][1]
    ax.set_title(f"Through Ray Serve (openai SDK, streaming)\n{device(src)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def _concurrencies(runs) -> list[int]:
    return ([r["concurrency"] for _, d in runs.get("serve", []) for r in d["sweep"]]
            + [d["concurrency"] for _, d in runs.get("loadgen", [])])


def _adapter_conditions(runs):
    for stem, d in runs.get("adapters", []):
        t = d.get("throughput") or {}
        if t.get("conditions"):
            return stem, d, t
    return None


def _adapter_throughput(ax, runs) -> None:
    stem, d, t = _adapter_conditions(runs)
    conds = list(t["conditions"])
    vals = [t["conditions"][c]["output_tokens_per_s"] for c in conds]
    bars = ax.bar(range(len(conds)), vals, color=["tab:blue"] + ["tab:orange"] * (len(conds) - 1), alpha=0.8)
    for i, c in enumerate(conds):
        runs_tok = t["conditions"][c].get("runs_tok_s") or []
        ax.plot([i] * len(runs_tok), runs_tok, "k.", ms=5, label="each round" if i == 0 else None)
        ratio = t["conditions"][c].get("over_base")
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}x", (i, bars[i].get_height()), ha="center", va="bottom", fontsize=9,
                        xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(conds)), [c.replace(" + ", "\n+ ") for c in conds], fontsize=8)
    ax.set_ylabel("output tokens/s (median round)")
    cfg = t.get("config", {})
    ax.set_title(f"Base vs mixed adapters through HTTP, concurrency {cfg.get('concurrency')}\n"
                 f"{device(d)}; ratio = over base only", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot_ttft(plt, runs, out: Path) -> Path | None:
    panels = []
    if runs.get("serve") or runs.get("loadgen"):
        panels.append(_http_ttft)
    if _adapter_conditions(runs):
        panels.append(_adapter_ttft)
    if runs.get("engine"):
        panels.append(_engine_ttft)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, fn in zip(axes[0], panels):
        fn(ax, runs)
    fig.suptitle("Time to first token", fontsize=13)
    fig.tight_layout()
    path = out / "ttft.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _http_ttft(ax, runs) -> None:
    series: list[tuple[str, list[int], dict[str, list]]] = []
    for stem, d in runs.get("serve", []):
        rows = sorted(d["sweep"], key=lambda r: r["concurrency"])
        for app in rows[0]["http"]:
            series.append((f"HTTP, {replicas(app)}", [r["concurrency"] for r in rows],
                           {p: [ms(r["http"][app]["ttft_s"].get(p)) for r in rows] for p in PERCENTILES}))
    for key, ds in _loadgen_series(runs).items():
        series.append((key, [d["concurrency"] for d in ds], {p: [ms(d["ttft_s"].get(p)) for d in ds]
                                                            for p in PERCENTILES}))
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"])
    for name, c, pct in series:
        col = next(colors, None)
        for p in PERCENTILES:
            pts = [(x, y) for x, y in zip(c, pct[p]) if y is not None]
            if pts:
                ax.plot(*zip(*pts), STYLES[p], marker="o", ms=4, color=col, label=f"{name} {p}")
    log_x(ax, _concurrencies(runs))
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("TTFT, ms (client side, first content chunk)")
    src = (runs.get("serve") or runs.get("loadgen"))[0][1]
    ax.set_title(f"TTFT percentiles vs concurrency\n{device(src)}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _adapter_ttft(ax, runs) -> None:
    stem, d, t = _adapter_conditions(runs)
    conds = list(t["conditions"])
    width = 0.8 / len(PERCENTILES)
    for j, p in enumerate(PERCENTILES):
        vals = [ms(t["conditions"][c]["ttft_s"].get(p)) or 0 for c in conds]
        ax.bar([i + (j - 1) * width for i in range(len(conds))], vals, width, label=p, alpha=0.85)
    ax.set_xticks(range(len(conds)), [c.replace(" + ", "\n+ ") for c in conds], fontsize=8)
    ax.set_ylabel("TTFT, ms")
    ax.set_title(f"TTFT: base vs mixed adapters, concurrency {t.get('config', {}).get('concurrency')}\n{device(d)}",
                 fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def _engine_ttft(ax, runs) -> None:
    stem, d = runs["engine"][0]
    t = d.get("ttft_ms") or {}
    cases = [k for k in ("text", "image", "vision_tower") if isinstance(t.get(k), dict)]
    names = {"text": f"text, {d['meta'].get('prompt_len', '?')} tokens",
             "image": f"image ({t.get('image_prompt_tokens', '?')} tokens)", "vision_tower": "of which vision tower"}
    for j, side in enumerate(("vlora", "hf")):
        vals = [t[c].get(side) or 0 for c in cases]
        bars = ax.bar([i + (j - 0.5) * 0.4 for i in range(len(cases))], vals, 0.4,
                      label="vlora engine" if side == "vlora" else "HF generate", alpha=0.85)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(cases)), [names[c] for c in cases], fontsize=8)
    ax.set_ylabel("ms, one request")
    ax.set_title(f"Engine alone, one request (no HTTP)\n{device(d)}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def plot_adapters(plt, runs, out: Path) -> Path | None:
    rows = [(stem, d) for stem, d in runs.get("adapters", []) if d.get("publish") or d.get("learn")]
    if not rows:
        return None
    stem, d = rows[0]
    panels = [fn for fn, key in ((_publish, "publish"), (_learn, "learn")) if d.get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.8 * len(panels), 4.6), squeeze=False)
    for ax, fn in zip(axes[0], panels):
        fn(ax, d)
    fig.suptitle("Adapters: publish-to-served and learn latency", fontsize=13)
    fig.tight_layout()
    path = out / "adapters.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _publish(ax, d) -> None:
    modes = list(dict.fromkeys(r["mode"] for r in d["publish"]))
    metrics = [("call_s", "call returned"), ("first_served_s", "first replica serves it"),
               ("both_served_s", "every replica serves it")]
    width = 0.8 / len(metrics)
    for j, (key, name) in enumerate(metrics):
        xs, meds = [], []
        for i, mode in enumerate(modes):
            vals = [r[key] * 1e3 for r in d["publish"] if r["mode"] == mode]
            x = i + (j - 1) * width
            ax.plot([x] * len(vals), vals, "k.", ms=4, alpha=0.6, label="each publish" if i == j == 0 else None)
            xs.append(x)
            meds.append(statistics.median(vals))
        bars = ax.bar(xs, meds, width, label=f"{name} (median)", alpha=0.75)
        for b, v in zip(bars, meds):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    stale = sum(r.get("stale_after_return", 0) for r in d["publish"])
    after = sum(r.get("requests_after_return", 0) for r in d["publish"])
    ax.set_xticks(range(len(modes)), modes, fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)  # room for the legend above the bars
    ax.set_ylabel("ms from the start of the publish call")
    reps = len({r["replicas_synced"] for r in d["publish"]}) and max(r["replicas_synced"] for r in d["publish"])
    ax.set_title(f"Publish-to-served on {reps} Decoder replicas ({device(d)})\nstale responses after the call "
                 f"returned: {stale} of {after}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper center", ncol=2)


def _learn(ax, d) -> None:
    rows = [r for r in d["learn"] if r.get("call") != "cold"]
    steps = sorted({r["steps"] for r in rows})
    for key, name, style in (("wall_s", "HTTP learn call", "o-"), ("trainer_s", "trainer's own time", "s--")):
        med = [statistics.median(r[key] for r in rows if r["steps"] == s) * 1e3 for s in steps]
        ax.plot(steps, med, style, label=f"{name} (median)")
    cold = [r for r in d["learn"] if r.get("call") == "cold"]
    for r in cold:
        ax.plot([r["steps"]], [r["wall_s"] * 1e3], "r*", ms=11, label="first call of the app (cold)")
    log_x(ax, steps, base=10)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training steps per call")
    ax.set_ylabel("ms")
    ax.set_title(f"Learn call latency (publish included)\n{device(d)}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot_serving_path(plt, runs, out: Path) -> Path | None:
    """bench/serve.py path: streamed tok/s vs streams (engine, floor, vlora) and before/after at 16 streams."""
    if not runs.get("serve_path"):
        return None
    stem, d = runs["serve_path"][-1]
    aft, bef = d["after"], d.get("before")
    cols = 4 if bef else 2
    fig, axes = plt.subplots(1, cols, figsize=(6.2 * cols, 4.6), squeeze=False)
    ax = axes[0][0]
    for n, style in zip(sorted({r["tokens"] for r in aft["grid"]}), ("-", "--")):
        eng = sorted((r["level"], r["tok_s"]) for r in aft["engine"] if r["tokens"] == n)
        rows = sorted((r for r in aft["grid"] if r["tokens"] == n and r["stream"]), key=lambda r: r["level"])
        lv = [r["level"] for r in rows]
        ax.plot([c for c, _ in eng], [t for _, t in eng], "s" + style, color="tab:gray", label=f"engine alone, {n} tok")
        ax.plot(lv, [r["floor"]["tok_s"] for r in rows], "^" + style, color="tab:green",
                label=f"floor (bare Serve), {n} tok")
        if all("floor_engine" in r for r in rows):
            ax.plot(lv, [r["floor_engine"]["tok_s"] for r in rows], "v" + style, color="tab:orange",
                    label=f"floor + vlora's engine, {n} tok")
        ax.plot(lv, [r["vlora"]["tok_s"] for r in rows], "o" + style, color="tab:blue", label=f"vlora HTTP, {n} tok")
    log_x(ax, [r["level"] for r in aft["grid"]])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Streamed: vlora vs its floor and the engine\n{aft['machine']['cpu']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    rows = sorted(aft["grid"], key=lambda r: (r["tokens"], not r["stream"], r["level"]))
    for (n, stream), style in zip(sorted({(r["tokens"], r["stream"]) for r in rows}), ("o-", "o--", "s-", "s--")):
        sel = [r for r in rows if (r["tokens"], r["stream"]) == (n, stream)]
        line, = ax.plot([r["level"] for r in sel], [r["vlora"]["tok_s"] / r["floor"]["tok_s"] for r in sel], style,
                        label=f"{n} tok, {'stream' if stream else 'non-stream'}")
        if n == 64 and stream and all("floor_engine" in r for r in sel):
            ax.plot([r["level"] for r in sel], [r["floor_engine"]["tok_s"] / r["floor"]["tok_s"] for r in sel], "v:",
                    color=line.get_color(), label="floor + vlora's engine, 64 tok, stream")
    ax.axhline(0.8, color="tab:red", lw=0.8, ls=":", label="target 0.8x at 16 streams, 64 tok")
    log_x(ax, [r["level"] for r in rows])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("tok/s / floor tok/s")
    ax.set_title("vlora against its floor (same run)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    if bef:
        ax = axes[0][2]
        lv = 16
        cells = [(n, s) for n in sorted({r["tokens"] for r in bef["grid"]}) for s in (True, False)]
        names = [f"{n} tok\n{'stream' if s else 'non-stream'}" for n, s in cells]
        def ratio(phase, n, s):
            r = next((r for r in phase["grid"] if (r["level"], r["tokens"], r["stream"]) == (lv, n, s)), None)
            return r["vlora"]["tok_s"] / r["floor"]["tok_s"] if r else 0
        x = range(len(cells))
        ax.bar([i - 0.2 for i in x], [ratio(bef, n, s) for n, s in cells], 0.4, label=f"before ({d.get('before_ref')})",
               color="tab:gray")
        ax.bar([i + 0.2 for i in x], [ratio(aft, n, s) for n, s in cells], 0.4, label="after", color="tab:blue")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_ylabel("vlora tok/s / its floor's")
        ax.set_title(f"Before vs after at {lv} streams (each against its own floor)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        ax = axes[0][3]  # the same cells in tok/s: a change of the ingress moves the floor too

        def tok_s(phase, n, s, side):
            r = next((r for r in phase["grid"] if (r["level"], r["tokens"], r["stream"]) == (lv, n, s)), None)
            return r[side]["tok_s"] if r else 0
        for off, phase, side, label, color in ((-0.3, bef, "floor", "floor, before", "tab:olive"),
                                               (-0.1, bef, "vlora", "vlora, before", "tab:gray"),
                                               (0.1, aft, "floor", "floor, after", "tab:green"),
                                               (0.3, aft, "vlora", "vlora, after", "tab:blue")):
            ax.bar([i + off for i in x], [tok_s(phase, n, s, side) for n, s in cells], 0.2, label=label, color=color)
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"Before vs after at {lv} streams, tok/s (each instance's own floor)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "serving_path.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- main --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", type=Path, help="JSON runs or folders of them (default: bench/results)")
    p.add_argument("--out", type=Path, default=HERE / "plots", help="where the PNGs go (default: bench/plots)")
    a = p.parse_args(argv)
    paths = a.paths or [HERE / "results"]
    missing = [x for x in paths if not x.exists()]
    for x in missing:
        print(f"skip {x}: no such file or folder", file=sys.stderr)
    runs = load([x for x in paths if x.exists()])
    if not runs:
        print("no benchmark runs to plot; pass the JSON files bench/engine.py, bench/serve.py, bench/adapters.py "
              "or `vlora bench` wrote with --json", file=sys.stderr)
        return 1
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/plot.py needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    print("runs: " + ", ".join(f"{k} x{len(v)}" for k, v in sorted(runs.items())))
    for name, fn, needs in (("throughput", plot_throughput, "engine, serve, adapters or vlora bench runs"),
                            ("ttft", plot_ttft, "engine, serve, adapters or vlora bench runs"),
                            ("adapters", plot_adapters, "an adapters.py run"),
                            ("serving_path", plot_serving_path, "a bench/serve.py path run")):
        path = fn(plt, runs, a.out)
        print(f"wrote {path}" if path else f"no {name} chart: needs {needs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
