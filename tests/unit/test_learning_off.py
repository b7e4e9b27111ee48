"""`learning: false` (a base model larger than one device, e.g. examples/qwen2.5-vl-72b.yaml): no Trainer,
and the learn routes say so with a 501 instead of failing somewhere inside."""

from __future__ import annotations

import asyncio
import types

from ray import serve

from vlora.deployments.config import AppConfig
from vlora.deployments.ingress import Ingress
from tests.unit.test_deadlines import Handle, Store, client


def test_learn_routes_answer_501_when_learning_is_off(tiny_model_dir, monkeypatch):
    config = AppConfig(model_dir=str(tiny_model_dir), served_model_name="tiny", device="cpu", admin_open=True,
                       learning=False)
    monkeypatch.delenv(config.api_keys_env, raising=False)
    monkeypatch.delenv(config.admin_keys_env, raising=False)
    cls = Ingress.__bases__[0]
    ing = cls.__new__(cls)
    cls.__init__(ing, config, Handle(None), Handle(None), Handle(None), None, Handle(Store()))
    monkeypatch.setattr(serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=ing))

    async def go():
        async with client() as c:
            learn = await c.post("/v1/adapters/colours/learn", json={"examples": [], "steps": 1})
            job = await c.get("/v1/adapters/colours/jobs/1")
        return learn, job

    learn, job = asyncio.run(go())
    for r in (learn, job):
        assert r.status_code == 501, r.text
        err = r.json()["error"]
        assert err["type"] == "not_implemented"
        assert "online learning is disabled on this server (learning: false" in err["message"]
