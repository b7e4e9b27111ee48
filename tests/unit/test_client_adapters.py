"""The client's adapter admin methods and the `vlora adapters` / `vlora learn` commands against
an in-memory fake of the admin API on loopback.

The fake keeps adapters as version lists, checks the admin key, and runs learn jobs that
advance one step per poll, so the tests see what goes over the wire (paths, bodies, converted
examples, inlined images, auth headers) and what the user sees (tables, loss summary, loss
curve, error lines, exit codes), with no model and no Ray.
"""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
from PIL import Image

from vlora.client.cli import SPARK, build_parser, main, sparkline
from vlora.client.client import VloraAPIError, VloraClient, example_from_record, load_examples
from tests.unit.fake_server import FakeServer, server_fixture

ADMIN = "adm1n"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def loss_at(step: int) -> float:
    return round(3.0 * 0.7 ** step, 6)


def version(name: str, v: int, origin: str = "loaded", parent: int | None = None, rank: int = 8,
            metrics: dict | None = None, source: str | None = "/srv/adapters/x") -> dict:
    return {"name": name, "version": v, "checksum": (str(v) * 64)[:64], "created": T0 + 60 * v, "origin": origin,
            "parent_version": parent, "rank": rank, "lora_alpha": 16.0, "use_rslora": False,
            "target_modules": ["q_proj", "v_proj"], "source": source, "metrics": metrics or {}}


def error(status: int, message: str, code: str | None = None) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": None,
                              "code": code or status}}


class FakeAdminServer(FakeServer):
    """The /v1/adapters routes, in memory. A learn job named `diverge` fails at step 2."""

    def __init__(self, admin_key: str | None = ADMIN):
        self.admin_key = admin_key
        self.adapters: dict[str, list[dict]] = {
            "a1": [version("a1", 1), version("a1", 2, "learned", 1, metrics={"loss_before": 2.5, "loss_after": 1.25})],
            "b2": [version("b2", 1, rank=4)],
        }
        self.jobs: dict[str, dict] = {}
        super().__init__()

    def route(self, method: str, path: str, body, headers: dict):
        with self.lock:
            if self.admin_key and headers.get("authorization") != f"Bearer {self.admin_key}":
                return error(401, "admin routes need an admin key", "invalid_api_key")
            return self._route(method, path, body)

    # -- the API ---------------------------------------------------------------------------
    def _publish(self, name: str, origin: str, parent: int | None, rank: int = 8, metrics: dict | None = None,
                 source: str | None = None) -> dict:
        versions = self.adapters.setdefault(name, [])
        v = version(name, (versions[-1]["version"] if versions else 0) + 1, origin, parent, rank, metrics, source)
        versions.append(v)
        return v

    def _route(self, method: str, path: str, body):
        parts = path.strip("/").split("/")  # v1 adapters [name [rollback|learn|jobs id]]
        if parts[:2] != ["v1", "adapters"]:
            return error(404, f"no route {path}")
        rest = parts[2:]
        if method == "GET" and not rest:
            return 200, {"object": "list", "data": [v[-1] for _, v in sorted(self.adapters.items())]}
        if method == "POST" and not rest:
            if not str(body.get("path", "")).startswith("/srv/adapters/"):
                return error(400, f"path {body.get('path')!r} is outside the directories adapters may be loaded from")
            v = self._publish(body["name"], "loaded", None, source=body["path"])
            return 200, {**v, "replicas_synced": 2}, {"x-adapter-version": str(v["version"])}
        name = rest[0]
        if method == "POST" and rest[1:] == ["learn"]:
            return self._learn(name, body)
        if method == "GET" and len(rest) == 3 and rest[1] == "jobs":
            return self._poll(name, rest[2])
        if name not in self.adapters:
            return error(404, f"adapter {name!r} not found", "adapter_not_found")
        versions = self.adapters[name]
        if method == "GET" and len(rest) == 1:
            return 200, {"name": name, "current": versions[-1]["version"], "versions": versions}
        if method == "DELETE" and len(rest) == 1:
            del self.adapters[name]
            return 200, {"name": name, "deleted": True}
        if method == "POST" and rest[1:] == ["rollback"]:
            target = (body or {}).get("version")
            if target is None:
                target = versions[-2]["version"] if len(versions) > 1 else None
            old = next((v for v in versions if v["version"] == target), None)
            if old is None:
                return error(404, f"adapter {name!r} has no version {target}", "adapter_not_found")
            return 200, self._publish(name, "rollback", old["version"], old["rank"], old["metrics"], old["source"])
        return error(404, f"no route {method} {path}")

    def _learn(self, name: str, body: dict):
        examples = body.get("examples")
        if not examples or not all(isinstance(e, dict) and isinstance(e.get("messages"), list) for e in examples):
            return error(400, "examples must be a non-empty list of {\"messages\": [...]} objects")
        if body.get("async") is not True:
            return error(400, "this fake only runs async jobs")
        job = {"id": f"job-{len(self.jobs) + 1}", "adapter": name, "status": "queued", "steps": body.get("steps", 20),
               "step": 0, "losses": [], "result": None, "error": None, "_n": len(examples),
               "_rank": body.get("rank", 8)}
        self.jobs[job["id"]] = job
        return 202, self._view(job)

    def _poll(self, name: str, job_id: str):
        job = self.jobs.get(job_id)
        if job is None or job["adapter"] != name:
            return error(404, f"no job {job_id!r} for adapter {name!r}", "job_not_found")
        if job["status"] in ("queued", "running"):  # one training step per poll
            job["status"] = "running"
            job["step"] += 1
            job["losses"].append(loss_at(job["step"]))
            if name == "diverge" and job["step"] == 2:
                job["status"] = "failed"
                job["error"] = {"status": 422,
                                "message": "training diverged (loss nan at step 2); nothing was published"}
            elif job["step"] >= job["steps"]:
                parent = self.adapters[name][-1]["version"] if name in self.adapters else None
                metrics = {"loss_before": loss_at(0), "loss_after": job["losses"][-1], "steps": job["steps"],
                           "num_examples": job["_n"], "seconds": 1.5}
                v = self._publish(name, "learned", parent, job["_rank"], metrics)
                job["status"] = "succeeded"
                job["result"] = {"adapter": name, "version": v["version"], "parent_version": parent, **metrics,
                                 "replicas_synced": 2}
        return 200, self._view(job)

    @staticmethod
    def _view(job: dict) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in job.items() if not k.startswith("_")}

    def calls(self, method: str | None = None, suffix: str = "") -> list[dict]:
        return [r for r in self.requests if (method is None or r["method"] == method) and r["path"].endswith(suffix)]


fake = server_fixture(FakeAdminServer)


def vlora(fake, *argv: str) -> int:
    return main(["--url", fake.url, "--admin-key", ADMIN, *argv])


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "imgs" / "cat.png"
    path.parent.mkdir()
    Image.new("RGB", (8, 6), (200, 30, 40)).save(path)
    return path


def b64url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


# -- adapters commands -----------------------------------------------------------------------
def test_adapters_list_table_with_admin_key(fake, capsys):
    assert vlora(fake, "adapters", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "ORIGIN", "PARENT", "RANK", "CREATED"]
    assert lines[1].split() == ["a1", "2", "learned", "1", "8", "2023-11-14T22:15:20Z"]
    assert lines[2].split() == ["b2", "1", "loaded", "-", "4", "2023-11-14T22:14:20Z"]
    assert len(lines) == 3
    (req,) = fake.requests
    assert (req["method"], req["path"]) == ("GET", "/v1/adapters")
    assert req["headers"]["authorization"] == f"Bearer {ADMIN}"
    # plain `vlora adapters` lists too
    assert vlora(fake, "adapters") == 0
    assert capsys.readouterr().out.splitlines() == lines


def test_admin_key_from_env_or_api_key(fake, monkeypatch, capsys):
    monkeypatch.setenv("VLORA_ADMIN_KEY", ADMIN)
    assert main(["--url", fake.url, "--api-key", "user-key", "adapters", "list"]) == 0
    assert fake.requests[-1]["headers"]["authorization"] == f"Bearer {ADMIN}"
    monkeypatch.delenv("VLORA_ADMIN_KEY")
    fake.admin_key = "user-key"  # a server with API keys only: admin routes take them
    assert main(["--url", fake.url, "adapters", "list", "--api-key", "user-key"]) == 0
    assert fake.requests[-1]["headers"]["authorization"] == "Bearer user-key"
    # chat keeps using the API key even when an admin key is given
    c = VloraClient(fake.url, api_key="user-key", admin_key=ADMIN)
    assert c.http.headers["authorization"] == "Bearer user-key"


def test_missing_admin_key_is_a_401_line(fake, capsys):
    assert main(["--url", fake.url, "adapters", "list"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: 401 admin routes need an admin key\n"
    assert captured.out == ""


def test_adapters_show_marks_current_version(fake, capsys):
    assert vlora(fake, "adapters", "show", "a1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a1: current version 2, 2 retained"
    assert lines[1].split() == ["VERSION", "ORIGIN", "PARENT", "RANK", "ALPHA", "CREATED", "LOSS", "CHECKSUM", "SOURCE"]
    assert lines[2].split() == ["1", "loaded", "-", "8", "16", "2023-11-14T22:14:20Z", "-", "1" * 12, "/srv/adapters/x"]
    assert lines[3].split() == ["*", "2", "learned", "1", "8", "16", "2023-11-14T22:15:20Z", "2.5->1.25",
                                "2" * 12, "/srv/adapters/x"]
    assert fake.requests[-1]["path"] == "/v1/adapters/a1"


def test_adapters_show_unknown_is_404(fake, capsys):
    assert vlora(fake, "adapters", "show", "nope") == 1
    assert capsys.readouterr().err == "error: 404 adapter 'nope' not found\n"


def test_adapters_load_delete_and_errors(fake, capsys, tmp_path, monkeypatch):
    assert vlora(fake, "adapters", "load", "c3", "/srv/adapters/c3") == 0
    assert capsys.readouterr().out == "loaded c3 version 1 (rank 8, synced to 2 replicas)\n"
    post = fake.calls("POST")[-1]
    assert (post["path"], post["body"]) == ("/v1/adapters", {"name": "c3", "path": "/srv/adapters/c3"})

    local = tmp_path / "peft_adapters" / "c4"  # a folder relative to the caller goes out absolute
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    vlora(fake, "adapters", "load", "c4", "peft_adapters/c4")  # (this fake allows /srv/adapters only: a 400)
    assert fake.calls("POST")[-1]["body"] == {"name": "c4", "path": str(local)}
    vlora(fake, "adapters", "load", "c5", "s3://bucket/c5")
    assert fake.calls("POST")[-1]["body"] == {"name": "c5", "path": "s3://bucket/c5"}
    capsys.readouterr()

    assert vlora(fake, "adapters", "load", "c3", "/etc") == 1
    captured = capsys.readouterr()
    assert captured.err == "error: 400 path '/etc' is outside the directories adapters may be loaded from\n"
    assert captured.out == ""

    assert vlora(fake, "adapters", "delete", "c3") == 0
    assert capsys.readouterr().out == "deleted c3\n"
    assert (fake.requests[-1]["method"], fake.requests[-1]["path"]) == ("DELETE", "/v1/adapters/c3")
    assert vlora(fake, "adapters", "delete", "c3") == 1
    assert capsys.readouterr().err == "error: 404 adapter 'c3' not found\n"


def test_adapters_rollback_default_and_explicit_version(fake, capsys):
    assert vlora(fake, "adapters", "rollback", "a1") == 0
    assert capsys.readouterr().out == "rolled back a1: version 3 is a copy of version 1\n"
    req = fake.requests[-1]
    assert (req["method"], req["path"], req["body"]) == ("POST", "/v1/adapters/a1/rollback", {})

    assert vlora(fake, "adapters", "rollback", "a1", "--version", "2") == 0
    assert capsys.readouterr().out == "rolled back a1: version 4 is a copy of version 2\n"
    assert fake.requests[-1]["body"] == {"version": 2}
    assert [v["origin"] for v in fake.adapters["a1"]] == ["loaded", "learned", "rollback", "rollback"]

    assert vlora(fake, "adapters", "rollback", "a1", "--version", "9") == 1
    assert capsys.readouterr().err == "error: 404 adapter 'a1' has no version 9\n"


def test_client_admin_methods(fake):
    c = VloraClient(fake.url, admin_key=ADMIN)
    assert [a["name"] for a in c.adapters()] == ["a1", "b2"]
    info = c.adapter("a1")
    assert info["current"] == 2 and [v["version"] for v in info["versions"]] == [1, 2]
    loaded = c.load_adapter("c3", "/srv/adapters/c3")
    assert (loaded["version"], loaded["replicas_synced"]) == (1, 2)
    new = c.rollback_adapter("a1", 1)
    assert (new["version"], new["origin"], new["parent_version"]) == (3, "rollback", 1)
    assert c.delete_adapter("c3") == {"name": "c3", "deleted": True}
    with pytest.raises(VloraAPIError) as ei:
        c.adapter("c3")
    assert (ei.value.status, ei.value.message) == (404, "adapter 'c3' not found")
    assert str(ei.value) == "404 adapter 'c3' not found"
    with pytest.raises(VloraAPIError) as ei:
        VloraClient(fake.url).adapters()  # no key
    assert ei.value.status == 401


# -- learn -----------------------------------------------------------------------------------
def test_learn_sends_converted_examples_and_prints_summary(fake, tmp_path, png, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": 7},
        "",  # blank lines are skipped
        {"prompt": "What colour?", "output": "Red.", "images": ["imgs/cat.png"], "logprob": -1.5},
        {"prompt": [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "imgs/cat.png"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg"}},
                        {"type": "text", "text": "Animals?"}]}],
         "output": "A cat and a dog."},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(png)}},
                                                    {"type": "text", "text": "abs"}]},
                      {"role": "assistant", "content": "ok"}]},
    ])
    rc = vlora(fake, "learn", "new1", "--data", data, "--steps", "5", "--lr", "0.01", "--rank", "4",
               "--alpha", "8", "--targets", "q_proj, v_proj", "--poll-s", "0.001")
    captured = capsys.readouterr()
    assert rc == 0, captured.err

    (post,) = fake.calls("POST", "/learn")
    assert post["path"] == "/v1/adapters/new1/learn"
    body = post["body"]
    assert {k: v for k, v in body.items() if k != "examples"} == {
        "steps": 5, "learning_rate": 0.01, "rank": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"],
        "async": True}
    img = {"type": "image_url", "image_url": {"url": b64url(png)}}
    assert body["examples"] == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": [img, {"type": "text", "text": "What colour?"}]},
                      {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [
                          img, {"type": "image_url", "image_url": {"url": "https://example.com/dog.jpg"}},
                          {"type": "text", "text": "Animals?"}]},
                      {"role": "assistant", "content": "A cat and a dog."}]},
        {"messages": [{"role": "user", "content": [img, {"type": "text", "text": "abs"}]},
                      {"role": "assistant", "content": "ok"}]},
    ]
    polls = fake.calls("GET", "")
    assert [p["path"] for p in polls] == ["/v1/adapters/new1/jobs/job-1"] * 5  # one step per poll

    lines = captured.out.splitlines()
    assert lines[0] == "loss 3 -> 0.5042 (5 steps, 4 examples, 1.5 s)"
    assert lines[1] == "new1 version 1 (new adapter), synced to 2 replicas"
    m = re.fullmatch(r"loss curve (\S+)  first (\S+)  min (\S+)  last (\S+)", lines[2])
    assert m, lines[2]
    curve = m.group(1)
    assert len(curve) == 5 and set(curve) <= set(SPARK)
    assert curve[0] == SPARK[-1] and curve[-1] == SPARK[0]
    assert list(curve) == sorted(curve, reverse=True)  # the loss only went down
    assert m.group(2, 3, 4) == ("2.1", "0.5042", "0.5042")
    assert len(lines) == 3
    assert fake.adapters["new1"][-1]["origin"] == "learned"


def test_learn_existing_adapter_reports_parent_and_image_dir(fake, tmp_path, png, capsys):
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "x.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                    {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "cat"}]}])
    assert vlora(fake, "learn", "a1", "--data", data, "--image-dir", str(png.parent), "--steps", "3",
                 "--poll-s", "0") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "a1 version 3 (from version 2), synced to 2 replicas"
    assert len(out[2].split()[2]) == 3
    body = fake.calls("POST", "/learn")[0]["body"]
    assert body["examples"][0]["messages"][0]["content"][0] == {"type": "image_url",
                                                               "image_url": {"url": b64url(png)}}
    assert (body["steps"], body["rank"], body["lora_alpha"], body["learning_rate"]) == (3, 8, 16.0, 0.001)
    assert "target_modules" not in body and "use_rslora" not in body  # server defaults


def test_learn_failed_job_is_an_error_line(fake, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "output": "a"}])
    assert vlora(fake, "learn", "diverge", "--data", data, "--steps", "10", "--poll-s", "0") == 1
    captured = capsys.readouterr()
    assert captured.err.endswith("error: 422 training diverged (loss nan at step 2); nothing was published\n")
    assert "loss curve" not in captured.out
    assert len(fake.calls("GET")) == 2


def test_learn_server_refusal_is_an_error_line(fake, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "output": "a"}])
    assert main(["--url", fake.url, "learn", "x", "--data", data]) == 1
    assert capsys.readouterr().err.endswith("error: 401 admin routes need an admin key\n")


@pytest.mark.parametrize("lines, message", [
    (['{"messages": [{"role": "user", "content": "a"}]}', "{not json"], "line 2: not valid JSON"),
    (['{"messages": [{"role": "user", "content": "a"}]}', '{"text": "hello"}'], 'line 2: missing "messages"'),
    (['[1, 2]'], "line 1: expected a JSON object, got list"),
    (['{"messages": []}'], "line 1: 'messages' must be a non-empty list"),
    (['{"prompt": "q"}'], "line 1: a record with 'prompt' needs an 'output' string"),
    (['{"prompt": "q", "output": "a", "images": ["missing.png"]}'],
     "line 1: messages[0].content[0]: cannot read image 'missing.png'"),
    ([], "no examples"),
])
def test_bad_jsonl_names_the_line_and_sends_nothing(fake, tmp_path, capsys, lines, message):
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    assert vlora(fake, "learn", "a1", "--data", data) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {data}")
    assert message in captured.err and captured.err.count("\n") == 1
    assert captured.out == "" and fake.requests == []


def test_learn_missing_data_file(fake, tmp_path, capsys):
    assert vlora(fake, "learn", "a1", "--data", str(tmp_path / "nope.jsonl")) == 1
    assert "No such file" in capsys.readouterr().err and fake.requests == []


def test_learn_no_wait_and_job_command(fake, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "output": "a"}])
    assert vlora(fake, "learn", "b2", "--data", data, "--steps", "2", "--no-wait", "--rslora") == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted job-1 for b2 (1 examples, 2 steps)")
    assert fake.calls("POST")[0]["body"]["use_rslora"] is True
    assert fake.calls("GET") == []
    assert vlora(fake, "adapters", "job", "b2", "job-1") == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["id"], job["status"], job["step"]) == ("job-1", "running", 1)
    assert vlora(fake, "adapters", "job", "b2", "job-9") == 1
    assert capsys.readouterr().err == "error: 404 no job 'job-9' for adapter 'b2'\n"


def test_client_learn_polls_and_reports_progress(fake):
    c = VloraClient(fake.url, admin_key=ADMIN)
    seen = []
    examples = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    job = c.learn("z", examples, steps=4, learning_rate=0.1, rank=None, poll_s=0.001,
                  on_progress=lambda j: seen.append((j["status"], j["step"])))
    assert seen == [("queued", 0), ("running", 1), ("running", 2), ("running", 3), ("succeeded", 4)]
    assert job["status"] == "succeeded" and job["losses"] == [loss_at(s) for s in range(1, 5)]
    assert job["result"]["version"] == 1 and job["result"]["loss_after"] == loss_at(4)
    body = fake.calls("POST")[0]["body"]
    assert body == {"examples": examples, "steps": 4, "learning_rate": 0.1, "async": True}  # None dropped

    queued = c.learn("z", examples, steps=1, wait=False)
    assert queued["status"] == "queued" and len(fake.calls("GET")) == 4

    with pytest.raises(VloraAPIError) as ei:
        c.learn("diverge", examples, steps=5, poll_s=0)
    assert ei.value.status == 422 and "diverged" in ei.value.message
    assert ei.value.job["status"] == "failed" and len(ei.value.job["losses"]) == 2

    with pytest.raises(VloraAPIError) as ei:
        c.learn("z", [], steps=1)
    assert ei.value.status == 400 and "non-empty" in ei.value.message


def test_client_learn_poll_sleeps_poll_s(fake):
    c = VloraClient(fake.url, admin_key=ADMIN)
    t0 = time.perf_counter()
    c.learn("z", [{"messages": [{"role": "user", "content": "q"}]}], steps=3, poll_s=0.05)
    assert time.perf_counter() - t0 >= 0.15


# -- helpers ---------------------------------------------------------------------------------
def test_sparkline():
    assert sparkline([3, 2, 1]) == SPARK[-1] + SPARK[4] + SPARK[0]
    assert sparkline([1.0, 1.0, 1.0]) == SPARK[4] * 3
    assert sparkline([]) == ""
    long = sparkline([float(i) for i in range(500)])
    assert len(long) == 60 and long[0] == SPARK[0] and long[-1] == SPARK[-1]
    assert sparkline([1.0, float("nan"), 0.0]) == SPARK[-1] + "×" + SPARK[0]


def test_example_from_record_and_load_examples(tmp_path, png):
    rec = example_from_record({"prompt": "q", "output": "a"})
    assert rec == {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    url = "data:image/png;base64,AAAA"
    rec = example_from_record({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": url}, {"type": "image_url", "image_url": {"url": f"file://{png}"}}]}]})
    assert rec["messages"][0]["content"] == [{"type": "image_url", "image_url": url},
                                             {"type": "image_url", "image_url": {"url": b64url(png)}}]
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ValueError, match="not a recognised image"):
        example_from_record({"prompt": "q", "output": "a", "images": [str(notes)]})
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "output": "a", "images": ["imgs/cat.png"]}])
    (ex,) = load_examples(path)
    assert ex["messages"][0]["content"][0]["image_url"]["url"] == b64url(png)


def test_existing_commands_still_parse():
    p = build_parser()
    assert p.parse_args(["models"]).func.__name__ == "_cmd_models"
    assert p.parse_args(["chat", "hi"]).func.__name__ == "_cmd_chat"
    args = p.parse_args(["adapters", "rollback", "a1", "--version", "3", "--admin-key", "k"])
    assert (args.func.__name__, args.name, args.version, args.admin_key) == ("_cmd_adapters_rollback", "a1", 3, "k")
    args = p.parse_args(["learn", "a1", "--data", "d.jsonl"])
    assert (args.steps, args.lr, args.rank, args.alpha, args.targets, args.image_dir) == (20, 1e-3, 8, 16.0, None, None)
