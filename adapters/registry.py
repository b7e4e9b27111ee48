"""The persistent, versioned adapter registry: a local directory of immutable PEFT folders + a manifest.

Layout under `root`::

    manifest.json            {"format": 1, "seq": N, "adapters": {...}, "retired": {...}}
    <name>/v<N>/             a PEFT folder (adapter_config.json + adapter_model.safetensors)

Rules:

* Versions are immutable and numbered 1, 2, 3... per adapter. A number is never reused: not after
  retention drops old versions, and not after `delete` + re-create either (the manifest remembers
  the next number of a deleted name in "retired"), so a replica that still caches an old version
  can never mistake it for a newer one.
* Crash safety: a publish writes the version folder first (temp dir + fsync + rename, see
  `save_peft_adapter`), fsyncs the directory, then replaces the manifest atomically (temp file in
  the same dir, fsync, `os.replace`, fsync the dir). A crash in between leaves only an orphan
  folder, which the next `AdapterRegistry` on the same root removes; the manifest never names a
  version without its files. Folders dropped by retention or `delete` are removed only after the
  manifest no longer names them.
* `validate` (e.g. the engine's `AdapterSlots.check`) and all other checks run before anything is
  written; a refused publish changes nothing.
* `rollback` publishes a NEW version (N+1) holding a copy of an older version's weights, so the
  served version number only ever grows.
* One writer per root: the registry is meant to be owned by a single process (the Ray actor that
  wraps it). Within that process every method is thread-safe.

No Ray import here: the actor that serves this over the cluster lives elsewhere.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from vlora.adapters.durable import write_json_atomic
from vlora.adapters.folders import read_files
from vlora.adapters.peft_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    parse_lora_state_dict,
    parse_peft_adapter,
    save_peft_adapter,
)
from vlora.engine.config import LORA_TARGET_MODULES
from vlora.engine.lora import LoRAWeights

ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = ("an adapter name must be 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter "
             "or digit (pattern ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$)")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
MAX_IDEMPOTENCY_KEYS = 4096  # the newest keys kept in the manifest (a retry comes within minutes)
ORIGINS = ("loaded", "learned", "rollback")
_RESERVED_NAMES = frozenset({MANIFEST_NAME})
NO_CHECK = -1  # `expect_current` default: publish whatever the current version is
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_TEMP_DIR = re.compile(r"^\.v[1-9][0-9]*-")
log = logging.getLogger(__name__)


class AdapterNameError(ValueError):
    """A name that cannot be an adapter name; the message states the rule."""


class AdapterNotFoundError(KeyError):
    """Unknown adapter, or a version that does not exist (or was dropped by retention)."""

    def __init__(self, name: str, version: int | None = None, message: str | None = None):
        self.name = name
        self.version = version
        if message is None:
            message = (f"adapter {name!r} not found" if version is None
                       else f"adapter {name!r} has no version {version}")
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would print repr(message) with quotes
        return self.message


class AdapterCorruptError(ValueError):
    """A stored version's files do not match the manifest (checksum mismatch, missing or unreadable)."""


class AdapterConflictError(ValueError):
    """A conditional publish whose condition no longer holds (the adapter changed or was deleted
    meanwhile), or an idempotency key reused for a different request: HTTP 409."""


def validate_adapter_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise AdapterNameError saying the rule."""
    if not isinstance(name, str):
        raise AdapterNameError(f"adapter name must be a string, got {type(name).__name__}; {NAME_RULE}")
    if ADAPTER_NAME_RE.fullmatch(name) is None:
        raise AdapterNameError(f"invalid adapter name {name!r}: {NAME_RULE}")
    if name in _RESERVED_NAMES:
        raise AdapterNameError(f"adapter name {name!r} is reserved by the registry; choose another name")
    return name


@dataclass(frozen=True, slots=True)
class VersionInfo:
    name: str
    version: int
    checksum: str  # sha256 hex of adapter_model.safetensors
    created: float  # unix time
    origin: str  # "loaded" | "learned" | "rollback"
    parent_version: int | None
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] = field(default_factory=list)  # module short names present, sorted
    source: str | None = None
    metrics: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return LoRAWeights.scaling_for(self.rank, self.lora_alpha, self.use_rslora)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "version": self.version, "checksum": self.checksum, "created": self.created,
            "origin": self.origin, "parent_version": self.parent_version, "rank": self.rank,
            "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules), "source": self.source,
            "metrics": copy.deepcopy(self.metrics),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "VersionInfo":
        return cls(
            name=d["name"], version=int(d["version"]), checksum=d["checksum"], created=float(d["created"]),
            origin=d["origin"], parent_version=None if d.get("parent_version") is None else int(d["parent_version"]),
            rank=int(d["rank"]), lora_alpha=float(d["lora_alpha"]), use_rslora=bool(d["use_rslora"]),
            target_modules=list(d.get("target_modules", [])), source=d.get("source"),
            metrics=copy.deepcopy(d.get("metrics") or {}),
        )


# ---------------------------------------------------------------------------------------------
# small filesystem helpers

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _same_weights(a: LoRAWeights, b: LoRAWeights) -> bool:
    return (a.rank == b.rank and a.weights.keys() == b.weights.keys()
            and all(torch.equal(a.weights[k][0], b.weights[k][0]) and torch.equal(a.weights[k][1], b.weights[k][1])
                    for k in a.weights))


def _check_weights(weights: LoRAWeights, lora_alpha: float, use_rslora: bool) -> None:
    """Structural checks that hold for any base model (the base-model fit is `validate`'s job)."""
    if not isinstance(weights, LoRAWeights):
        raise TypeError(f"weights must be LoRAWeights, got {type(weights).__name__}")
    r = weights.rank
    if not isinstance(r, int) or r < 1:
        raise AdapterFormatError(f"adapter rank must be a positive integer, got {r!r}")
    if not weights.weights:
        raise AdapterFormatError("adapter holds no LoRA weights")
    if not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise AdapterFormatError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    expected = LoRAWeights.scaling_for(r, float(lora_alpha), use_rslora)
    if not math.isclose(weights.scaling, expected, rel_tol=1e-6, abs_tol=1e-12):
        raise AdapterFormatError(
            f"weights.scaling={weights.scaling} does not match lora_alpha={lora_alpha}, r={r}, "
            f"use_rslora={use_rslora} (expected {expected})")
    for key, pair in weights.weights.items():
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int) and key[0] >= 0
                and key[1] in LORA_TARGET_MODULES):
            raise AdapterFormatError(
                f"weight key {key!r} must be (layer >= 0, module) with module in {', '.join(LORA_TARGET_MODULES)}")
        a, b = pair
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise AdapterFormatError(f"layer {key[0]} {key[1]}: A and B must be tensors")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterFormatError(
                f"layer {key[0]} {key[1]}: A {tuple(a.shape)} / B {tuple(b.shape)} do not match r={r} "
                f"(A must be [r, in], B [out, r])")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterFormatError(f"layer {key[0]} {key[1]}: weights contain NaN or Inf")


# ---------------------------------------------------------------------------------------------

class AdapterRegistry:
    """Versioned LoRA adapters on a local directory. See the module docstring for the rules."""

    def __init__(self, root: str | os.PathLike, retention: int = 5,
                 validate: Callable[[LoRAWeights], None] | None = None):
        if not isinstance(retention, int) or retention < 1:
            raise ValueError(f"retention must be an integer >= 1, got {retention!r}")
        self.root = Path(root)
        self.retention = retention
        self.validate = validate
        self._lock = threading.RLock()
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifest = self._read_manifest()
        self._clean_orphans()

    # ---- read-only API ------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """Change counter: +1 on every publish (incl. load_folder and rollback) and delete; persisted."""
        with self._lock:
            return self._manifest["seq"]

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / validate_adapter_name(name) / f"v{int(version)}"

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return isinstance(name, str) and name in self._manifest["adapters"]

    def current(self, name: str) -> VersionInfo:
        with self._lock:
            entry = self._entry(name)
            return VersionInfo.from_dict(entry["versions"][str(entry["current"])])

    def versions(self, name: str) -> list[VersionInfo]:
        """The retained versions of `name`, ascending."""
        with self._lock:
            entry = self._entry(name)
            return [VersionInfo.from_dict(entry["versions"][k]) for k in sorted(entry["versions"], key=int)]

    def list(self) -> dict[str, VersionInfo]:
        """name -> current version, sorted by name."""
        with self._lock:
            out = {}
            for name in sorted(self._manifest["adapters"]):
                entry = self._manifest["adapters"][name]
                out[name] = VersionInfo.from_dict(entry["versions"][str(entry["current"])])
            return out

    def weights(self, name: str, version: int | None = None) -> tuple[VersionInfo, LoRAWeights]:
        """Read a version (None = current) from disk; the file's sha256 must match the manifest."""
        with self._lock:
            info = self._info(name, version)
        path = self.root / info.name / f"v{info.version}" / WEIGHTS_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            with self._lock:  # dropped by retention / deleted while we were reading?
                self._info(name, info.version)
            raise AdapterCorruptError(
                f"adapter {name!r} version {info.version}: {path} is missing although the manifest lists it") from None
        except OSError as e:
            raise AdapterCorruptError(f"adapter {name!r} version {info.version}: cannot read {path}: {e}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.checksum:
            raise AdapterCorruptError(
                f"adapter {name!r} version {info.version}: checksum mismatch for {path} "
                f"(manifest sha256 {info.checksum}, file sha256 {digest}); the stored file is corrupt")
        try:
            tensors = load_safetensors_bytes(data)
            cfg = {"r": info.rank, "lora_alpha": info.lora_alpha, "use_rslora": info.use_rslora}
            lw = parse_lora_state_dict(tensors, cfg)
        except (SafetensorError, AdapterFormatError, ValueError, OSError) as e:
            raise AdapterCorruptError(f"adapter {name!r} version {info.version}: unreadable {path}: {e}") from None
        return info, lw

    # ---- mutating API -------------------------------------------------------------------------

    def publish(self, name: str, weights: LoRAWeights, lora_alpha: float, use_rslora: bool = False,
                origin: str = "learned", parent_version: int | None = None, source: str | None = None,
                metrics: dict | None = None, expect_current: int | None = NO_CHECK,
                idempotency_key: str | None = None) -> VersionInfo:
        """Store `weights` as the next version of `name` (creating the adapter if new) and make it current.

        `expect_current` (compare-and-set): the version that must be current, None = the adapter must
        not exist; otherwise AdapterConflictError and nothing is written. A repeated `idempotency_key`
        returns the version its first call made instead of making another."""
        validate_adapter_name(name)
        with self._lock:
            done = self._replay(idempotency_key, "publish", name)
            if done is not None:
                return done
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}")
        metrics = {} if metrics is None else metrics
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        try:
            metrics = json.loads(json.dumps(metrics, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"metrics must be JSON-serialisable (finite numbers, str keys): {e}") from None
        use_rslora = bool(use_rslora)
        _check_weights(weights, lora_alpha, use_rslora)
        if self.validate is not None:
            self.validate(weights)  # its exception propagates unchanged; nothing written yet
        with self._lock:
            done = self._replay(idempotency_key, "publish", name)
            if done is not None:
                return done
            self._check_current(name, expect_current)
            return self._publish_locked(name, weights, float(lora_alpha), use_rslora, origin, parent_version,
                                        None if source is None else str(source), metrics, idempotency_key)

    def publish_many(self, items: list[dict]) -> list[VersionInfo]:
        """Publish several adapters with one manifest write (bulk registration): each item holds
        `name`, `weights`, `lora_alpha` and optionally `use_rslora`, `origin`, `source`. All are
        checked before anything is written; a failure writes none of them."""
        prepared = []
        for it in items:
            name = validate_adapter_name(it["name"])
            use_rslora = bool(it.get("use_rslora", False))
            _check_weights(it["weights"], it["lora_alpha"], use_rslora)
            if self.validate is not None:
                self.validate(it["weights"])
            prepared.append((name, it["weights"], float(it["lora_alpha"]), use_rslora, it.get("origin", "loaded"),
                             it.get("source")))
        if len({p[0] for p in prepared}) != len(prepared):
            raise ValueError("publish_many takes each adapter name once")
        with self._lock:
            new = copy.deepcopy(self._manifest)
            written, out = [], []
            try:
                for name, weights, alpha, rslora, origin, source in prepared:
                    info, _, dropped, created = self._write_version(new, name, weights, alpha, rslora, origin, None,
                                                                    source, {})
                    written.append((name, info.version, dropped, created))
                    out.append(info)
                self._write_manifest(new)
            except BaseException:
                for name, version, _, created in written:
                    self._discard_partial(self.root / name, version, created)
                raise
            self._manifest = new
            for name, _, dropped, _ in written:
                for v in dropped:
                    _rmtree(self.root / name / f"v{v}")
            _fsync_dir(self.root)
            return out

    def load_folder(self, name: str, folder: str | os.PathLike, allowed_dirs: list[str] | None = None,
                    max_file_bytes: int = 2 * 2**30, idempotency_key: str | None = None) -> VersionInfo:
        """Publish a PEFT adapter folder as the next version of `name` (origin "loaded", source = folder).

        The folder must lie inside `allowed_dirs` (when given); its files are read without following
        symlinks and at most `max_file_bytes` each (AdapterPathError). Raises AdapterFormatError
        (from peft_io) for a folder that is not a servable PEFT LoRA."""
        validate_adapter_name(name)
        with self._lock:
            done = self._replay(idempotency_key, "publish", name)
            if done is not None:
                return done
        files = read_files(str(folder), (CONFIG_NAME, WEIGHTS_NAME), max_file_bytes, allowed_dirs)
        return self.load_files(name, files, str(folder), idempotency_key=idempotency_key)

    def load_files(self, name: str, files: dict[str, bytes | None], source: str,
                   unless_current: bool = False, idempotency_key: str | None = None) -> VersionInfo:
        """Publish a PEFT adapter from its files' contents (read by `adapters.folders.read_files`).
        With `unless_current`, an adapter whose current version holds the same weights, alpha and
        rslora flag is left as it is (start-up registration: a restart publishes nothing new)."""
        validate_adapter_name(name)
        lw, cfg = parse_peft_adapter(files.get(CONFIG_NAME), files.get(WEIGHTS_NAME))
        alpha, rslora = float(cfg.get("lora_alpha", lw.rank)), bool(cfg.get("use_rslora", False))
        if unless_current and name in self.list():
            info, current = self.weights(name)
            if info.lora_alpha == alpha and info.use_rslora == rslora and _same_weights(current, lw):
                return info
        return self.publish(name, lw, lora_alpha=alpha, use_rslora=rslora, origin="loaded", source=source,
                            idempotency_key=idempotency_key)

    def rollback(self, name: str, to_version: int | None = None, idempotency_key: str | None = None) -> VersionInfo:
        """Publish a new version N+1 holding a copy of `to_version` (default: the retained version
        before the current one); origin "rollback", parent_version = to_version."""
        with self._lock:
            done = self._replay(idempotency_key, "publish", name)
            if done is not None:
                return done
            entry = self._entry(name)
            cur = entry["current"]
            if to_version is None:
                earlier = [int(v) for v in entry["versions"] if int(v) < cur]
                if not earlier:
                    raise AdapterNotFoundError(
                        name, None, f"adapter {name!r} has no retained version before v{cur} to roll back to")
                to_version = max(earlier)
            old, lw = self.weights(name, to_version)
            return self.publish(name, lw, lora_alpha=old.lora_alpha, use_rslora=old.use_rslora, origin="rollback",
                                parent_version=old.version, source=old.source, metrics=old.metrics,
                                idempotency_key=idempotency_key)

    def delete(self, name: str, idempotency_key: str | None = None) -> None:
        """Remove the adapter: manifest entry first, then its files. Its version numbers are not reused."""
        with self._lock:
            if self._replay(idempotency_key, "delete", name) is not None:
                return
            entry = self._entry(name)
            new = copy.deepcopy(self._manifest)
            del new["adapters"][name]
            new["retired"][name] = entry["next_version"]
            new["seq"] += 1
            self._remember(new, idempotency_key, "delete", name, None)
            self._write_manifest(new)
            self._manifest = new
            _rmtree(self.root / name)
            _fsync_dir(self.root)

    # ---- internals ----------------------------------------------------------------------------

    def _entry(self, name: str) -> dict:
        validate_adapter_name(name)
        entry = self._manifest["adapters"].get(name)
        if entry is None:
            raise AdapterNotFoundError(name)
        return entry

    def _info(self, name: str, version: int | None) -> VersionInfo:
        entry = self._entry(name)
        v = entry["current"] if version is None else version
        d = entry["versions"].get(str(v)) if isinstance(v, int) and not isinstance(v, bool) else None
        if d is None:
            kept = ", ".join(f"v{k}" for k in sorted(entry["versions"], key=int))
            why = " (dropped by retention)" if isinstance(v, int) and 1 <= v < entry["next_version"] else ""
            raise AdapterNotFoundError(name, version,
                                       f"adapter {name!r} has no version {version!r}{why}; retained versions: {kept}")
        return VersionInfo.from_dict(d)

    def _check_current(self, name: str, expect: int | None) -> None:
        if expect == NO_CHECK:
            return
        entry = self._manifest["adapters"].get(name)
        current = None if entry is None else entry["current"]
        if current == expect:
            return
        if expect is None:
            raise AdapterConflictError(f"adapter {name!r} was created meanwhile (now v{current}); "
                                       "nothing was published: learn again to continue from it")
        if current is None:
            raise AdapterConflictError(f"adapter {name!r} was deleted meanwhile (this change started from "
                                       f"v{expect}); nothing was published")
        raise AdapterConflictError(f"adapter {name!r} changed meanwhile: this change started from v{expect} but "
                                   f"v{current} is current now (a load, rollback or learn published it); nothing "
                                   "was published: retry to build on the current version")

    def _replay(self, key: str | None, op: str, name: str) -> VersionInfo | dict | None:
        """What an earlier call with idempotency `key` did, or None if the key is new."""
        if key is None:
            return None
        done = self._manifest["idempotency"].get(key)
        if done is None:
            return None
        if done["op"] != op or done["name"] != name:
            raise AdapterConflictError(f"idempotency key {key!r} was already used for a {done['op']} of adapter "
                                       f"{done['name']!r}; send a new key for a different request")
        if op == "delete":
            return {"name": name, "deleted": True}
        entry = self._manifest["adapters"].get(name)
        d = entry["versions"].get(str(done["version"])) if entry is not None else None
        if d is None:  # that version was since dropped by retention or deleted
            raise AdapterConflictError(f"idempotency key {key!r} already made version {done['version']} of "
                                       f"{name!r}, which is no longer retained")
        return VersionInfo.from_dict(d)

    @staticmethod
    def _remember(manifest: dict, key: str | None, op: str, name: str, version: int | None) -> None:
        if key is None:
            return
        keys = manifest["idempotency"]
        keys[key] = {"op": op, "name": name, "version": version, "seq": manifest["seq"]}
        while len(keys) > MAX_IDEMPOTENCY_KEYS:
            del keys[min(keys, key=lambda k: keys[k]["seq"])]

    def _write_version(self, new: dict, name, weights, lora_alpha, use_rslora, origin, parent_version, source,
                       metrics) -> tuple[VersionInfo, Path, list[int], bool]:
        """Write the next version's folder and enter it into `new` (a manifest copy); returns the info,
        its folder, the versions retention drops (their folders are removed once `new` is written)
        and whether the adapter's directory was created for it."""
        entry = new["adapters"].get(name)
        version = entry["next_version"] if entry is not None else new["retired"].get(name, 1)
        if parent_version is not None:
            parent_version = int(parent_version)
        name_dir = self.root / name
        created_dir = not name_dir.exists()
        vdir = name_dir / f"v{version}"
        try:
            save_peft_adapter(vdir, weights, lora_alpha=lora_alpha, use_rslora=use_rslora)
            _fsync_dir(name_dir)
            if created_dir:
                _fsync_dir(self.root)
            checksum = _sha256_file(vdir / WEIGHTS_NAME)
        except BaseException:
            self._discard_partial(name_dir, version, created_dir)
            raise
        info = VersionInfo(
            name=name, version=version, checksum=checksum, created=time.time(), origin=origin,
            parent_version=parent_version, rank=weights.rank, lora_alpha=lora_alpha, use_rslora=use_rslora,
            target_modules=sorted({m for _, m in weights.weights}), source=source, metrics=metrics,
        )
        new_entry = new["adapters"].setdefault(name, {"current": version, "next_version": version, "versions": {}})
        new_entry["versions"][str(version)] = info.to_dict()
        new_entry["current"] = version
        new_entry["next_version"] = version + 1
        new["retired"].pop(name, None)
        kept = sorted((int(k) for k in new_entry["versions"]), reverse=True)[: self.retention]
        dropped = [int(k) for k in new_entry["versions"] if int(k) not in kept]
        for v in dropped:
            del new_entry["versions"][str(v)]
        new["seq"] += 1
        return info, vdir, dropped, created_dir

    def _publish_locked(self, name, weights, lora_alpha, use_rslora, origin, parent_version, source, metrics,
                        idempotency_key=None):
        new = copy.deepcopy(self._manifest)
        info, vdir, dropped, created_dir = self._write_version(new, name, weights, lora_alpha, use_rslora, origin,
                                                               parent_version, source, metrics)
        self._remember(new, idempotency_key, "publish", name, info.version)
        name_dir = vdir.parent
        try:
            self._write_manifest(new)
        except BaseException:
            self._discard_partial(name_dir, info.version, created_dir)
            raise
        self._manifest = new
        for v in dropped:  # only after the manifest no longer names them
            _rmtree(name_dir / f"v{v}")
        if dropped:
            _fsync_dir(name_dir)
        return VersionInfo.from_dict(info.to_dict())

    def _discard_partial(self, name_dir: Path, version: int, created_dir: bool) -> None:
        """Undo a failed publish: the new version folder, save_peft_adapter's temp dir, a new empty name dir."""
        _rmtree(name_dir / f"v{version}")
        if name_dir.is_dir():
            for p in name_dir.glob(f".v{version}-*"):
                _rmtree(p)
            if created_dir:
                try:
                    name_dir.rmdir()
                except OSError:
                    pass

    def _read_manifest(self) -> dict:
        path = self.manifest_path
        if not path.exists():
            return {"format": MANIFEST_FORMAT, "seq": 0, "adapters": {}, "retired": {}, "idempotency": {}}
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            # Never "recover" by starting empty: orphan cleaning would then delete every adapter.
            raise AdapterCorruptError(f"registry manifest {path} is unreadable: {e}") from None
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise AdapterCorruptError(
                f"registry manifest {path} has format {m.get('format') if isinstance(m, dict) else None!r}; "
                f"this version reads format {MANIFEST_FORMAT}")
        m.setdefault("retired", {})
        m.setdefault("idempotency", {})
        try:
            for name, entry in m["adapters"].items():
                for d in entry["versions"].values():
                    VersionInfo.from_dict(d)
                if str(entry["current"]) not in entry["versions"]:
                    raise ValueError(f"current version {entry['current']} of {name!r} is not listed")
                int(entry["next_version"])
            int(m["seq"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AdapterCorruptError(f"registry manifest {path} is malformed: {e!r}") from None
        return m

    def _write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest, indent=1, allow_nan=False)
        _fsync_dir(self.root)

    def _clean_orphans(self) -> None:
        """Remove what a crash can leave behind: manifest temp files, save_peft_adapter temp dirs,
        version folders the manifest does not name, and adapter dirs left empty by that.
        Anything that does not look like ours is left alone."""
        adapters = self._manifest["adapters"]
        for p in self.root.iterdir():
            # leftovers of an interrupted manifest write (".manifest-*" from earlier versions)
            if p.name.startswith((f".{self.manifest_path.name}-", ".manifest-")) and p.name.endswith(".tmp") \
                    and p.is_file():
                p.unlink(missing_ok=True)
                continue
            if not p.is_dir() or p.is_symlink() or ADAPTER_NAME_RE.fullmatch(p.name) is None:
                continue
            known = adapters.get(p.name, {}).get("versions", {})
            removed = False
            for child in p.iterdir():
                m = _VERSION_DIR.match(child.name)
                if child.is_dir() and not child.is_symlink() and (
                        (m is not None and m.group(1) not in known)
                        or _TEMP_DIR.match(child.name)):
                    _rmtree(child)
                    removed = True
            if p.name not in adapters:
                try:
                    p.rmdir()  # only if empty
                except OSError:
                    pass
            if removed:
                _fsync_dir(p)
        for name, entry in adapters.items():
            for v in entry["versions"]:
                if not (self.root / name / f"v{v}" / WEIGHTS_NAME).is_file():
                    # Kept in the manifest on purpose (reading it raises AdapterCorruptError) rather
                    # than silently dropped, which could move "current" backwards.
                    log.warning("adapter %r version %s is in the manifest but its files are missing", name, v)
