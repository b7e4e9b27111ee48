"""Image preprocessing throughput: engine.images.ImageTransform vs HF's Qwen2VLImageProcessorPil.

    python bench/preprocess.py [--model-dir DIR] [--n 200] [--sizes 448x448,1024x768]

Both sides start from the same decoded PIL RGB image (noise over a gradient) and end with
float32 `pixel_values` as a torch tensor; loading/decoding is not timed. The two are run in
alternating blocks so a noisy machine slows both alike. Without --model-dir the tiny
checkpoint is generated into a temp dir (min_pixels 3136, max_pixels 200704).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from vlora.engine.images import ImageTransform  # noqa: E402

BLOCKS = 5  # alternating timing blocks per implementation


def test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height)[:, None, None]
    x = np.linspace(0, 255, width)[None, :, None]
    pixels = (x + y) / 2 + rng.normal(0, 40, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def time_alternating(fns: dict, n: int) -> dict[str, float]:
    """Seconds per call for each fn, timed in BLOCKS alternating blocks of n / BLOCKS calls."""
    for fn in fns.values():  # warm-up: first-call allocations, lazy imports
        for _ in range(5):
            fn()
    total = dict.fromkeys(fns, 0.0)
    per_block = max(1, n // BLOCKS)
    for _ in range(BLOCKS):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(per_block):
                fn()
            total[name] += time.perf_counter() - start
    return {name: seconds / (per_block * BLOCKS) for name, seconds in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="checkpoint folder with preprocessor_config.json (default: tiny model)")
    parser.add_argument("--n", type=int, default=200, help="images per implementation and size")
    parser.add_argument("--sizes", default="448x448,1024x768", help="comma-separated WIDTHxHEIGHT")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from vlora.engine.tiny import write_tiny_model

            model_dir = write_tiny_model(Path(tmp) / "tiny", seed=0)
        ours = ImageTransform.from_pretrained(model_dir)
        hf = Qwen2VLImageProcessorPil.from_pretrained(model_dir)

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({affinity} usable), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"Pillow {PIL.__version__}, numpy {np.__version__}, Python {platform.python_version()}"
    )
    print(f"model: {model_dir} (min_pixels {ours.min_pixels}, max_pixels {ours.max_pixels}); n={args.n} per row")
    print(f"{'input':>10} {'resized':>10} {'impl':>6} {'images/s':>10} {'ms/image':>9}")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        img = test_image(width, height)
        ours_out = ours(img)
        hf_out = hf(img, return_tensors="pt")
        max_diff = (ours_out.pixel_values - hf_out["pixel_values"]).abs().max().item()
        resized_h, resized_w = ours.resized_size(height, width)

        seconds = time_alternating(
            {"vlora": lambda: ours(img), "hf": lambda: hf(img, return_tensors="pt")}, args.n
        )
        for name in ("vlora", "hf"):
            print(
                f"{size:>10} {f'{resized_w}x{resized_h}':>10} {name:>6} "
                f"{1 / seconds[name]:>10.1f} {seconds[name] * 1e3:>9.3f}"
            )
        print(f"{size:>10} speedup vlora/hf = {seconds['hf'] / seconds['vlora']:.2f}x  (max |diff| {max_diff:.1e})")


if __name__ == "__main__":
    main()
