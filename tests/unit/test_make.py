"""The README's commands: `make setup` is a stamp target (a second `make serve` does no pip work, a
changed pyproject.toml / constraints.txt reinstalls, a fresh clone installs everything), and
`make serve` prints the ready URL only once the routes answer."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from vlora.deployments.launch import base_url, wait_until_ready
from tests.unit.fake_server import FakeServer

ROOT = Path(__file__).resolve().parents[2]


def _make(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """`make` in `repo` as a user runs it, also when this suite itself runs under `make test` (whose
    MAKEFLAGS / MAKELEVEL would make the inner make print its directory changes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", *args], cwd=repo, capture_output=True, text=True, check=True, env=env)


def dry_run(repo: Path, target: str) -> str:
    return _make(repo, "-n", target).stdout


@pytest.fixture
def repo(tmp_path):
    if shutil.which("make") is None:
        pytest.fail("make is needed: the README's commands are make targets")
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_setup_installs_on_a_fresh_clone_and_only_when_the_pins_change(repo):
    fresh = dry_run(repo, "test")  # CI: `make test` on a fresh clone installs everything first
    assert "-m venv .venv" in fresh and "pip install -q -c constraints.txt -e '.[test]'" in fresh
    assert fresh.strip().endswith("python -m pytest -q tests")
    (repo / ".venv/bin").mkdir(parents=True)
    (repo / ".venv/bin/python").touch()
    (repo / ".venv/.installed").touch()  # what a finished setup leaves
    assert "Nothing to be done for 'setup'" in _make(repo, "setup").stdout
    serve = dry_run(repo, "serve")  # a second `make serve`: no pip at all
    assert "pip" not in serve
    assert serve.strip() == ".venv/bin/python -m vlora.deployments.launch serve_config.yaml --metrics-export-port 8080"
    later = time.time() + 10
    os.utime(repo / "constraints.txt", (later, later))  # a pin changed: install again
    assert "pip install -q -c constraints.txt" in dry_run(repo, "setup")


class SlowStart(FakeServer):
    """/health is 404 (routes not deployed yet), then 503, then 200."""

    def __init__(self):
        super().__init__()
        self.answers = [404, 503]

    def route(self, method, path, body, headers):
        assert path == "/health"
        status = self.answers.pop(0) if self.answers else 200
        return status, {"status": "ok" if status == 200 else "starting"}


def test_ready_only_once_health_answers_200():
    server = SlowStart()
    try:
        assert wait_until_ready(server.url, timeout_s=10, poll_s=0.01)
        assert [r["path"] for r in server.requests] == ["/health"] * 3
        server.answers = [503] * 1000
        assert not wait_until_ready(server.url, timeout_s=0.2, poll_s=0.01)
    finally:
        server.close()


def test_ready_url_of_the_shipped_config():
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert base_url(config) == "http://127.0.0.1:8000"


def test_cluster_env_is_haproxy_ingress_where_serve_finds_haproxy_unless_the_operator_chose(monkeypatch):
    from vlora.deployments import launch

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.setattr(launch, "haproxy_available", lambda: True)
    assert launch.cluster_env() == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    monkeypatch.setattr(launch, "haproxy_available", lambda: False)  # macOS: ray[serve] brings no binary
    assert launch.cluster_env() == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    monkeypatch.setattr(launch, "haproxy_available", lambda: True)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # Serve's Python proxy, chosen by the operator
    assert launch.cluster_env() == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", raising=False)
    assert launch.cluster_env(one_node=True) == {"RAY_SERVE_ENABLE_HA_PROXY": "0",
                                                 "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def test_the_ray_that_make_serve_starts_gets_the_cluster_env(monkeypatch, tmp_path):
    import ray

    from vlora.deployments import launch

    class Started(Exception):
        pass

    def fake_init(**kwargs):  # what the raylet and every Ray process would inherit
        raise Started(dict(os.environ))

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(launch, "haproxy_available", lambda: True)
    monkeypatch.setattr(ray, "init", fake_init)
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump({"applications": []}))
    with pytest.raises(Started) as started:
        launch.main([str(config)])
    assert started.value.args[0]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert started.value.args[0]["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
