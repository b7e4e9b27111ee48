"""Adapter sources: fsspec URIs (memory:// and file:// here) with the allow-list as URI prefixes, 404 for
a missing folder, start-up registration that publishes nothing new for an unchanged adapter. The
loaded weights answer with HF+PEFT's greedy output."""

from __future__ import annotations

import fsspec
import pytest

from vlora.adapters.folders import AdapterPathError, AdapterSourceNotFoundError, read_files
from vlora.adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME
from vlora.adapters.registry import AdapterRegistry
from vlora.deployments.app import prepare_config
from vlora.deployments.errors import api_error_for
from vlora.engine.config import EngineConfig
from vlora.engine.engine import LLMEngine
from vlora.engine.sampling import SamplingParams
from tests.unit.oracle import peft_generate, random_peft_adapter

NAMES = (CONFIG_NAME, WEIGHTS_NAME)


@pytest.fixture(scope="module")
def peft_dir(hf_model, tmp_path_factory):
    return random_peft_adapter(hf_model, tmp_path_factory.mktemp("peft") / "a", seed=7, r=4, alpha=8)


@pytest.fixture
def memory_adapter(peft_dir):
    """The PEFT folder's files in fsspec's memory filesystem, at memory://team/adapters/a."""
    fs = fsspec.filesystem("memory")
    for name in NAMES:
        fs.pipe(f"/team/adapters/a/{name}", (peft_dir / name).read_bytes())
    yield "memory://team/adapters/a"
    fs.rm("/team", recursive=True)


def test_memory_uri_loads_and_answers_like_hf_peft(memory_adapter, peft_dir, tmp_path, tiny_model_dir, hf_model,
                                                   tokenizer):
    reg = AdapterRegistry(tmp_path / "store")
    info = reg.load_folder("mem", memory_adapter, allowed_dirs=["memory://team/adapters"])
    assert (info.version, info.origin, info.source) == (1, "loaded", memory_adapter)
    engine = LLMEngine(EngineConfig(str(tiny_model_dir), max_loras=2, max_lora_rank=8))
    engine.add_lora("mem", reg.weights("mem")[1])
    prompt = tokenizer("The colour of the sky is").input_ids
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), adapters=["mem"])
    assert out[0][0] == peft_generate(hf_model, peft_dir, prompt, 8)


def test_uri_allow_list_is_by_prefix_and_protocol(memory_adapter, peft_dir):
    files = read_files(memory_adapter, NAMES, 2**30, ["memory://team/adapters"])
    assert files == {n: (peft_dir / n).read_bytes() for n in NAMES}
    assert read_files(memory_adapter, NAMES, 2**30, ["memory://team/adapters/a/"]) == files  # the folder itself
    for allowed in (["memory://team/adapt"], ["memory://other"], ["s3://team/adapters"], [str(peft_dir.parent)], []):
        with pytest.raises(AdapterPathError, match="outside the locations"):
            read_files(memory_adapter, NAMES, 2**30, allowed)
    with pytest.raises(AdapterPathError, match=r"'\.\.' segments"):
        read_files("memory://team/adapters/../secret/a", NAMES, 2**30, ["memory://team/adapters"])
    with pytest.raises(AdapterPathError, match="above the limit of 100"):
        read_files(memory_adapter, NAMES, 100, None)
    with pytest.raises(AdapterPathError, match="install the fsspec package"):
        read_files("nosuchproto://bucket/a", NAMES, 2**30, None)


def test_a_missing_folder_is_a_404_local_file_uri_or_remote(tmp_path):
    for missing in (str(tmp_path / "nope"), f"file://{tmp_path}/nope", "memory://team/adapters/nope"):
        allowed = [str(tmp_path), "memory://team/adapters"]
        with pytest.raises(AdapterSourceNotFoundError) as e:
            read_files(missing, NAMES, 2**30, allowed)
        api = api_error_for(e.value)
        assert (api.status, api.code, api.param) == (404, "adapter_source_not_found", "path")
        assert "does not exist" in api.message


def test_file_uri_reads_the_local_folder_with_the_same_checks(peft_dir):
    files = read_files(f"file://{peft_dir}", NAMES, 2**30, [f"file://{peft_dir.parent}"])
    assert files[WEIGHTS_NAME] == (peft_dir / WEIGHTS_NAME).read_bytes()
    with pytest.raises(AdapterPathError, match="outside the directories"):
        read_files(f"file://{peft_dir}", NAMES, 2**30, ["memory://team"])


def test_startup_registration_publishes_only_a_changed_adapter(peft_dir, hf_model, tmp_path):
    reg = AdapterRegistry(tmp_path / "store")
    files = read_files(str(peft_dir), NAMES, 2**30)
    assert reg.load_files("a", files, str(peft_dir), unless_current=True).version == 1
    assert reg.load_files("a", files, str(peft_dir), unless_current=True).version == 1  # a restart: unchanged
    other = random_peft_adapter(hf_model, tmp_path / "b", seed=8, r=4, alpha=8)
    changed = read_files(str(other), NAMES, 2**30)
    assert reg.load_files("a", changed, str(other), unless_current=True).version == 2
    assert reg.load_files("a", changed, str(other)).version == 3  # an explicit load always publishes


def test_config_paths_become_absolute_and_uris_stay(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = prepare_config({"model_dir": str(tiny_model_dir), "adapter_load_dirs": ["peft", "s3://b/adapters"],
                          "adapters": [{"name": "x", "path": "peft/x"}, {"name": "y", "path": "memory://m/y"}]})
    assert cfg.adapter_load_dirs == [str(tmp_path / "peft"), "s3://b/adapters"]
    assert [a.path for a in cfg.adapters] == [str(tmp_path / "peft" / "x"), "memory://m/y"]

