"""Reading checkpoint tensors from safetensors files (sharded or not), never unpickling."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_files(model_dir: str | Path, want: Callable[[str], bool] = lambda name: True) -> list[Path]:
    """The safetensors files holding tensors that pass `want`: from the shard index, or the single file."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted({f for name, f in json.loads(index.read_text())["weight_map"].items() if want(name)})
        return [d / s for s in shards]
    single = d / "model.safetensors"
    files = [single] if single.exists() else sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {d}")
    return files


def iter_tensors(model_dir: str | Path, want: Callable[[str], bool],
                 region: Callable[[str, tuple[int, ...]], tuple[slice, ...] | None] | None = None,
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the checkpoint tensors whose name passes `want`, one at a time.

    `region(name, shape)` may name a slice to read instead of the whole tensor (a tensor-parallel
    rank's shard): only that slice is read from the file."""
    for f in checkpoint_files(model_dir, want):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if not want(name):
                    continue
                if region is None:
                    yield name, st.get_tensor(name)
                    continue
                sl = st.get_slice(name)
                part = region(name, tuple(sl.get_shape()))
                yield name, (st.get_tensor(name) if part is None else sl[part])
