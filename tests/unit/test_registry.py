"""The versioned adapter registry: persistence, retention, rollback, corruption and crash recovery."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch

from vlora.adapters.peft_io import WEIGHTS_NAME, AdapterFormatError, load_peft_adapter, save_peft_adapter
from vlora.adapters.registry import (
    ADAPTER_NAME_RE,
    AdapterConflictError,
    AdapterCorruptError,
    AdapterNameError,
    AdapterNotFoundError,
    AdapterRegistry,
    VersionInfo,
    validate_adapter_name,
)
from vlora.engine.lora import AdapterSlots, LoRASlotError, LoRAWeights

HIDDEN = 16


def rand_lora(seed: int, r: int = 4, alpha: float = 8.0, use_rslora: bool = False, layers: int = 2,
              modules=("q_proj", "v_proj")) -> LoRAWeights:
    g = torch.Generator().manual_seed(seed)
    w = {(l, m): (torch.randn(r, HIDDEN, generator=g), torch.randn(HIDDEN, r, generator=g))
         for l in range(layers) for m in modules}
    return LoRAWeights(rank=r, scaling=LoRAWeights.scaling_for(r, alpha, use_rslora), weights=w)


def same_weights(x: LoRAWeights, y: LoRAWeights) -> bool:
    if x.rank != y.rank or x.scaling != y.scaling or set(x.weights) != set(y.weights):
        return False
    return all(torch.equal(x.weights[k][0], y.weights[k][0]) and torch.equal(x.weights[k][1], y.weights[k][1])
               for k in x.weights)


def tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def reg(tmp_path):
    return AdapterRegistry(tmp_path / "store", retention=3)


def test_publish_versions_current_seq(reg):
    assert reg.seq == 0 and reg.list() == {}
    w1, w2 = rand_lora(1), rand_lora(2, r=2, alpha=4.0, use_rslora=True)
    i1 = reg.publish("alpha", w1, lora_alpha=8.0, metrics={"loss": 0.5}, source="job-1")
    assert (i1.name, i1.version, i1.origin, i1.parent_version) == ("alpha", 1, "learned", None)
    assert (i1.rank, i1.lora_alpha, i1.use_rslora) == (4, 8.0, False)
    assert i1.target_modules == ["q_proj", "v_proj"] and i1.metrics == {"loss": 0.5} and i1.source == "job-1"
    assert i1.checksum == hashlib.sha256((reg.root / "alpha" / "v1" / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert reg.seq == 1
    i2 = reg.publish("alpha", w2, lora_alpha=4.0, use_rslora=True, parent_version=1)
    assert i2.version == 2 and i2.parent_version == 1 and reg.seq == 2
    reg.publish("beta", rand_lora(3), lora_alpha=8.0)
    assert reg.seq == 3
    assert reg.current("alpha") == i2
    assert [v.version for v in reg.versions("alpha")] == [1, 2]
    assert list(reg.list()) == ["alpha", "beta"] and reg.list()["alpha"] == i2
    info, w = reg.weights("alpha")
    assert info == i2 and same_weights(w, w2)
    info, w = reg.weights("alpha", 1)
    assert info == i1 and same_weights(w, w1)
    # the stored folder is an ordinary PEFT folder
    lw, cfg = load_peft_adapter(reg.root / "alpha" / "v2")
    assert same_weights(lw, w2) and cfg["r"] == 2 and cfg["use_rslora"] is True
    d = i2.to_dict()
    assert json.loads(json.dumps(d)) == d and VersionInfo.from_dict(d) == i2


def test_reload_from_disk_is_identical(tmp_path):
    root = tmp_path / "store"
    reg = AdapterRegistry(root, retention=3)
    ws = {}
    for i in range(4):
        reg.publish("a", ws.setdefault(("a", i + 1), rand_lora(10 + i)), lora_alpha=8.0, metrics={"step": i})
    reg.publish("b", ws.setdefault(("b", 1), rand_lora(20)), lora_alpha=8.0)
    reg.delete("b")
    reg.publish("c", ws.setdefault(("c", 1), rand_lora(30)), lora_alpha=8.0)
    before = (reg.seq, reg.list(), reg.versions("a"), reg.versions("c"))

    again = AdapterRegistry(root, retention=3)
    assert (again.seq, again.list(), again.versions("a"), again.versions("c")) == before
    for name in ("a", "c"):
        for v in again.versions(name):
            info, w = again.weights(name, v.version)
            assert info.checksum == v.checksum and same_weights(w, ws[(name, v.version)])
    assert again.publish("a", rand_lora(99), lora_alpha=8.0).version == 5
    assert again.seq == before[0] + 1


def test_retention_keeps_last_k(reg):
    for i in range(6):
        reg.publish("a", rand_lora(i), lora_alpha=8.0)
    assert [v.version for v in reg.versions("a")] == [4, 5, 6]
    assert sorted(p.name for p in (reg.root / "a").iterdir()) == ["v4", "v5", "v6"]
    with pytest.raises(AdapterNotFoundError, match="dropped by retention"):
        reg.weights("a", 2)
    assert reg.current("a").version == 6


def test_rollback_publishes_new_version(tmp_path):
    reg = AdapterRegistry(tmp_path / "store", retention=4)
    w = [rand_lora(i) for i in range(3)]
    for x in w:
        reg.publish("a", x, lora_alpha=8.0, metrics={"m": 1})
    seq = reg.seq
    rb = reg.rollback("a")  # default: the version before the current one
    assert (rb.version, rb.origin, rb.parent_version) == (4, "rollback", 2)
    v2 = next(v for v in reg.versions("a") if v.version == 2)
    assert rb.checksum == v2.checksum and rb.metrics == {"m": 1}  # same bytes as v2
    assert same_weights(reg.weights("a")[1], w[1]) and reg.seq == seq + 1
    rb2 = reg.rollback("a", to_version=1)
    assert (rb2.version, rb2.parent_version) == (5, 1) and same_weights(reg.weights("a")[1], w[0])
    assert [v.version for v in reg.versions("a")] == [2, 3, 4, 5]  # retention 4
    with pytest.raises(AdapterNotFoundError, match="no version 1"):
        reg.rollback("a", to_version=1)  # retained away
    with pytest.raises(AdapterNotFoundError, match="no version 42"):
        reg.rollback("a", to_version=42)
    reg.publish("solo", rand_lora(7), lora_alpha=8.0)
    with pytest.raises(AdapterNotFoundError, match="no retained version before v1"):
        reg.rollback("solo")


def test_checksum_corruption_detected(reg):
    reg.publish("a", rand_lora(1), lora_alpha=8.0)
    path = reg.root / "a" / "v1" / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterCorruptError, match="checksum mismatch"):
        reg.weights("a")
    with pytest.raises(AdapterCorruptError):
        reg.rollback("a", to_version=1)
    path.unlink()
    with pytest.raises(AdapterCorruptError, match="missing"):
        reg.weights("a", 1)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_weights", "no_config", "bad_json"])
def test_load_folder_bad_folder_changes_nothing(reg, tmp_path, damage):
    reg.publish("a", rand_lora(1), lora_alpha=8.0)
    folder = save_peft_adapter(tmp_path / "src", rand_lora(2), lora_alpha=8.0)
    wf, cf = folder / WEIGHTS_NAME, folder / "adapter_config.json"
    if damage == "truncate":
        wf.write_bytes(wf.read_bytes()[:100])
    elif damage == "garbage":
        wf.write_bytes(b"\x00" * 64)
    elif damage == "no_weights":
        wf.unlink()
    elif damage == "no_config":
        cf.unlink()
    else:
        cf.write_text("{not json")
    seq, lst, files = reg.seq, reg.list(), tree(reg.root)
    for name in ("a", "new"):
        with pytest.raises(AdapterFormatError):
            reg.load_folder(name, folder)
    assert (reg.seq, reg.list(), tree(reg.root)) == (seq, lst, files)


def test_load_folder_ok(reg, tmp_path):
    w = rand_lora(5, r=2, alpha=16.0, use_rslora=True)
    folder = save_peft_adapter(tmp_path / "src", w, lora_alpha=16.0, use_rslora=True)
    info = reg.load_folder("ext", folder)
    assert (info.origin, info.source, info.version, info.lora_alpha, info.use_rslora) == (
        "loaded", str(folder), 1, 16.0, True)
    assert same_weights(reg.weights("ext")[1], w)


def test_load_real_peft_folder(reg, tmp_path, hf_model):
    from tests.unit.oracle import random_peft_adapter

    folder = random_peft_adapter(hf_model, tmp_path / "peft", seed=3, r=4, alpha=8.0,
                                 targets=("q_proj", "v_proj", "down_proj"))
    expected, _ = load_peft_adapter(folder)
    info = reg.load_folder("real", folder)
    assert info.target_modules == ["down_proj", "q_proj", "v_proj"] and info.rank == 4
    assert same_weights(reg.weights("real")[1], expected)
    assert same_weights(AdapterRegistry(reg.root).weights("real")[1], expected)


def test_validate_refusal_writes_nothing(tmp_path):
    shapes = {(l, m): (HIDDEN, HIDDEN) for l in range(2) for m in ("q_proj", "v_proj")}
    slots = AdapterSlots(num_slots=1, max_rank=4, module_shapes=shapes, dtype=torch.float32, device="cpu")
    calls = []

    def validate(w):
        calls.append(w)
        slots.check(w)

    reg = AdapterRegistry(tmp_path / "store", validate=validate)
    reg.publish("a", rand_lora(1, r=4), lora_alpha=8.0)
    seq, files = reg.seq, tree(reg.root)
    manifest = (reg.root / "manifest.json").read_bytes()
    for name, w in (("a", rand_lora(2, r=8)), ("b", rand_lora(3, modules=("k_proj",))), ("c", rand_lora(4, layers=3))):
        with pytest.raises(LoRASlotError):
            reg.publish(name, w, lora_alpha=8.0)
    assert len(calls) == 4
    assert (reg.seq, tree(reg.root), (reg.root / "manifest.json").read_bytes()) == (seq, files, manifest)
    assert list(reg.list()) == ["a"]


def test_structural_checks_write_nothing(reg):
    w = rand_lora(1)
    bad_nan = rand_lora(2)
    bad_nan.weights[(0, "q_proj")][0][0, 0] = float("nan")
    with pytest.raises(AdapterFormatError, match="scaling"):
        reg.publish("a", w, lora_alpha=3.0)  # weights.scaling was made with alpha 8
    with pytest.raises(AdapterFormatError, match="NaN"):
        reg.publish("a", bad_nan, lora_alpha=8.0)
    with pytest.raises(ValueError, match="JSON"):
        reg.publish("a", w, lora_alpha=8.0, metrics={"x": object()})
    with pytest.raises(ValueError, match="origin"):
        reg.publish("a", w, lora_alpha=8.0, origin="stolen")
    assert reg.seq == 0 and tree(reg.root) == []


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "-lead", ".hidden", "a b", "a\n", "manifest.json"])
def test_bad_names(reg, name):
    with pytest.raises(AdapterNameError) as e:
        reg.publish(name, rand_lora(1), lora_alpha=8.0)
    if name != "manifest.json":
        assert "[A-Za-z0-9][A-Za-z0-9._-]{0,63}" in str(e.value) and "starting with a letter or digit" in str(e.value)
    for call in (lambda: reg.current(name), lambda: reg.weights(name), lambda: reg.delete(name)):
        with pytest.raises(AdapterNameError):
            call()
    assert tree(reg.root) == [] and reg.seq == 0


def test_good_names():
    for name in ("a", "A1", "x" * 64, "my-adapter_v1.2", "0lead"):
        assert validate_adapter_name(name) == name and ADAPTER_NAME_RE.match(name)
    with pytest.raises(AdapterNameError, match="string"):
        validate_adapter_name(None)  # type: ignore[arg-type]


def test_delete(reg):
    reg.publish("a", rand_lora(1), lora_alpha=8.0)
    reg.publish("a", rand_lora(2), lora_alpha=8.0)
    reg.publish("b", rand_lora(3), lora_alpha=8.0)
    reg.delete("a")
    assert reg.seq == 4 and list(reg.list()) == ["b"] and not (reg.root / "a").exists()
    with pytest.raises(AdapterNotFoundError):
        reg.current("a")
    with pytest.raises(AdapterNotFoundError):
        reg.delete("a")
    # version numbers of a deleted adapter are not reused
    assert reg.publish("a", rand_lora(4), lora_alpha=8.0).version == 3
    assert AdapterRegistry(reg.root).current("a").version == 3


def test_crash_leftovers_cleaned_on_reload(tmp_path):
    root = tmp_path / "store"
    reg = AdapterRegistry(root)
    w = rand_lora(1)
    reg.publish("a", w, lora_alpha=8.0)
    # a crash after the version folder was written but before the manifest named it
    save_peft_adapter(root / "a" / "v2", rand_lora(2), lora_alpha=8.0)
    save_peft_adapter(root / "ghost" / "v1", rand_lora(3), lora_alpha=8.0)
    # a crash inside save_peft_adapter / _write_manifest
    (root / "a" / ".v2-abc123").mkdir()
    (root / "a" / ".v2-abc123" / WEIGHTS_NAME).write_bytes(b"partial")
    (root / ".manifest-xyz.tmp").write_text("{partial")
    # not ours: left alone
    (root / "README.txt").write_text("hello")
    (root / ".not-ours").mkdir()

    again = AdapterRegistry(root)
    assert tree(root) == sorted([".not-ours", "README.txt", "a", "a/v1", "a/v1/adapter_config.json",
                                 "a/v1/adapter_model.safetensors", "manifest.json"])
    assert again.seq == 1 and list(again.list()) == ["a"]
    assert same_weights(again.weights("a")[1], w)
    nxt = again.publish("a", rand_lora(4), lora_alpha=8.0)
    assert nxt.version == 2 and again.publish("ghost", rand_lora(5), lora_alpha=8.0).version == 1


def test_corrupt_manifest_is_not_wiped(tmp_path):
    root = tmp_path / "store"
    AdapterRegistry(root).publish("a", rand_lora(1), lora_alpha=8.0)
    (root / "manifest.json").write_text("{broken")
    with pytest.raises(AdapterCorruptError, match="manifest"):
        AdapterRegistry(root)
    assert (root / "a" / "v1" / WEIGHTS_NAME).is_file()


def test_not_found_messages(reg):
    with pytest.raises(AdapterNotFoundError) as e:
        reg.current("nope")
    assert str(e.value) == "adapter 'nope' not found" and isinstance(e.value, KeyError)
    assert e.value.name == "nope" and e.value.version is None
    reg.publish("a", rand_lora(1), lora_alpha=8.0)
    with pytest.raises(AdapterNotFoundError) as e:
        reg.weights("a", 7)
    assert str(e.value) == "adapter 'a' has no version 7; retained versions: v1" and e.value.version == 7
    for call in (lambda: reg.versions("nope"), lambda: reg.weights("nope"), lambda: reg.rollback("nope"),
                 lambda: reg.delete("nope")):
        with pytest.raises(AdapterNotFoundError, match="adapter 'nope' not found"):
            call()


def test_concurrent_publishes(tmp_path):
    reg = AdapterRegistry(tmp_path / "store", retention=100)
    errors = []

    def worker(k):
        try:
            for i in range(5):
                reg.publish(f"n{k % 2}", rand_lora(k * 10 + i), lora_alpha=8.0)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and reg.seq == 20
    for name in ("n0", "n1"):
        assert [v.version for v in reg.versions(name)] == list(range(1, 11))
    assert AdapterRegistry(reg.root, retention=100).list() == reg.list()


def test_retention_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="retention"):
        AdapterRegistry(tmp_path, retention=0)


def test_failed_manifest_write_leaves_no_trace(reg, monkeypatch):
    reg.publish("a", rand_lora(1), lora_alpha=8.0)
    seq, lst, files = reg.seq, reg.list(), tree(reg.root)

    def boom(manifest):
        raise OSError("disk full")

    monkeypatch.setattr(reg, "_write_manifest", boom)
    for name in ("a", "b"):
        with pytest.raises(OSError, match="disk full"):
            reg.publish(name, rand_lora(2), lora_alpha=8.0)
    with pytest.raises(OSError, match="disk full"):
        reg.delete("a")
    assert (reg.seq, reg.list(), tree(reg.root)) == (seq, lst, files)
    monkeypatch.undo()
    assert reg.publish("a", rand_lora(3), lora_alpha=8.0).version == 2


# -- idempotency keys, compare-and-set, bulk registration ----------------------------------------

def test_idempotency_key_makes_one_version(tmp_path):
    reg = AdapterRegistry(tmp_path / "store", retention=3)
    a = reg.publish("k", rand_lora(1), lora_alpha=8.0, idempotency_key="req-1")
    again = reg.publish("k", rand_lora(2), lora_alpha=8.0, idempotency_key="req-1")  # a retry of the same call
    assert (a.version, again.version, again.checksum) == (1, 1, a.checksum)
    assert [v.version for v in reg.versions("k")] == [1] and reg.seq == 1
    reg.publish("k", rand_lora(3), lora_alpha=8.0, idempotency_key="req-2")
    rb = reg.rollback("k", 1, idempotency_key="rb-1")
    assert reg.rollback("k", 1, idempotency_key="rb-1").version == rb.version == 3
    reg.delete("k", idempotency_key="del-1")
    reg.delete("k", idempotency_key="del-1")  # the retry of a delete that happened: no 404
    # the keys survive a restart (they are in the manifest, written with the version)
    reg2 = AdapterRegistry(tmp_path / "store", retention=3)
    reg2.publish("k", rand_lora(4), lora_alpha=8.0, idempotency_key="new")
    assert reg2.publish("k", rand_lora(5), lora_alpha=8.0, idempotency_key="new").version == 4
    with pytest.raises(AdapterConflictError, match="already used for a publish of adapter 'k'"):
        reg2.publish("other", rand_lora(6), lora_alpha=8.0, idempotency_key="new")
    with pytest.raises(AdapterConflictError, match="already used for a delete"):
        reg2.publish("k", rand_lora(6), lora_alpha=8.0, idempotency_key="del-1")


def test_compare_and_set_on_the_current_version(reg):
    reg.publish("cas", rand_lora(1), lora_alpha=8.0)
    assert reg.publish("cas", rand_lora(2), lora_alpha=8.0, expect_current=1).version == 2
    with pytest.raises(AdapterConflictError, match="started from v1 but v2 is current"):
        reg.publish("cas", rand_lora(3), lora_alpha=8.0, expect_current=1)
    with pytest.raises(AdapterConflictError, match="created meanwhile"):
        reg.publish("cas", rand_lora(3), lora_alpha=8.0, expect_current=None)
    assert reg.publish("fresh", rand_lora(3), lora_alpha=8.0, expect_current=None).version == 1
    reg.delete("cas")
    with pytest.raises(AdapterConflictError, match="deleted meanwhile"):
        reg.publish("cas", rand_lora(4), lora_alpha=8.0, expect_current=2)
    assert "cas" not in reg and reg.seq == 4  # refused publishes wrote nothing
    assert not (reg.root / "cas").exists()


def test_publish_many_one_manifest_write(reg, monkeypatch):
    writes = []
    real = reg._write_manifest
    monkeypatch.setattr(reg, "_write_manifest", lambda m: (writes.append(1), real(m)))
    reg.publish("a0", rand_lora(9), lora_alpha=8.0)
    infos = reg.publish_many([{"name": f"a{i}", "weights": rand_lora(i, r=1), "lora_alpha": 8.0}
                              for i in range(20)])
    assert len(writes) == 2 and [i.version for i in infos] == [2] + [1] * 19
    assert reg.seq == 21 and len(reg.list()) == 20
    assert same_weights(reg.weights("a7")[1], rand_lora(7, r=1))
    with pytest.raises(AdapterNameError):
        reg.publish_many([{"name": "ok1", "weights": rand_lora(1), "lora_alpha": 8.0},
                          {"name": "-bad", "weights": rand_lora(1), "lora_alpha": 8.0}])
    assert "ok1" not in reg and reg.seq == 21
