"""Installed, vlora is one import name: nothing it ships collides with another distribution's package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_ships_one_top_level_package_named_vlora(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = zipfile.ZipFile(next(tmp_path.glob("vlora-*.whl")))
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"vlora"}
    assert {"vlora/engine/engine.py", "vlora/engine/data/corpus.txt", "vlora/deployments/app.py",
            "vlora/adapters/store.py", "vlora/client/cli.py"} <= set(names)
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vlora = vlora.client.cli:main" in wheel.read(info).decode()


def test_the_serve_configs_import_the_app_from_the_vlora_namespace():
    for cfg in [ROOT / "serve_config.yaml", *sorted((ROOT / "examples").glob("*.yaml"))]:
        paths = [line.split(":", 1)[1].strip() for line in cfg.read_text().splitlines()
                 if line.strip().startswith("import_path:")]
        assert paths and all(p == "vlora.deployments.app:build_app" for p in paths), cfg
