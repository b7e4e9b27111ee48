"""The README's recipe for a PEFT adapter of the tiny model works as written: run from the repo root
(models/tiny as `make serve` writes it), its folder is inside the shipped serve_config.yaml's
adapter_load_dirs and loads, and it answers with HF+PEFT's greedy output."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import yaml

from vlora.adapters.registry import AdapterRegistry
from vlora.deployments.app import prepare_config
from vlora.engine.config import EngineConfig
from vlora.engine.engine import LLMEngine
from vlora.engine.sampling import SamplingParams
from tests.unit.oracle import peft_generate

ROOT = Path(__file__).resolve().parents[2]


def readme_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_readme_peft_recipe_loads_on_the_shipped_config(tmp_path, monkeypatch, tiny_model_dir, hf_model, tokenizer):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "make_adapter.py"
    script.write_text(readme_block("get_peft_model"))
    runpy.run_path(str(script), run_name="__main__")
    folder = tmp_path / "peft_adapters" / "my-adapter"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()

    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    config = prepare_config(args | {"model_dir": str(tiny_model_dir), "generate_tiny_model_if_missing": False})
    assert config.adapter_load_dirs == [str(tmp_path / "peft_adapters")]
    reg = AdapterRegistry(tmp_path / "store")
    info = reg.load_folder("my-adapter", str(folder), config.adapter_load_dirs)
    assert (info.version, info.rank) == (1, 8)

    engine = LLMEngine(EngineConfig(str(tiny_model_dir), max_loras=1, max_lora_rank=config.engine.max_lora_rank))
    engine.add_lora("my-adapter", reg.weights("my-adapter")[1])
    prompt = tokenizer("What colour is this?").input_ids
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = engine.generate([prompt, prompt], sp, adapters=["my-adapter", None])
    assert out[0][0] == peft_generate(hf_model, folder, prompt, 6)
    assert out[0][0] != out[1][0]  # the adapter changes the answer
