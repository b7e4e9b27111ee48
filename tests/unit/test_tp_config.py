"""`engine.tensor_parallel_size` in the app's wiring: one placement-group bundle per rank, packed on one node."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from vlora.deployments.app import _deployment, prepare_config
from vlora.deployments.config import AppConfig
from vlora.deployments.decoder import Decoder

ROOT = Path(__file__).resolve().parents[2]


def decoder_deployment(config: AppConfig, gpu_share: float = 0.0):
    return _deployment(Decoder, "Decoder", config.decoder, gpu_share, config.engine.tensor_parallel_size)


def test_the_72b_example_asks_for_four_gpus_on_one_node():
    args = yaml.safe_load((ROOT / "examples/qwen2.5-vl-72b.yaml").read_text())["applications"][0]["args"]
    config = AppConfig.model_validate(args)
    assert config.engine.tensor_parallel_size == 4 and config.learning is False
    d = decoder_deployment(config, gpu_share=1.0)
    rc = d._replica_config
    assert rc.placement_group_bundles == [{"CPU": 4, "GPU": 0.9}] * 4
    assert rc.placement_group_strategy == "STRICT_PACK"
    assert rc.ray_actor_options["num_gpus"] == 0.9  # the replica (rank 0) fits its bundle


def test_tp_on_cpu_and_auto_gpu_shares():
    cpu = AppConfig(engine={"tensor_parallel_size": 2}, decoder={"num_cpus": 0.1})
    rc = decoder_deployment(cpu)._replica_config
    assert rc.placement_group_bundles == [{"CPU": 0.1}] * 2 and rc.placement_group_strategy == "STRICT_PACK"
    # num_gpus left on auto: a whole device per rank (a tensor-parallel rank never shares a GPU's share)
    rc = decoder_deployment(cpu, gpu_share=0.35)._replica_config
    assert rc.placement_group_bundles == [{"CPU": 0.1, "GPU": 1.0}] * 2
    assert decoder_deployment(AppConfig())._replica_config.placement_group_bundles is None  # tp=1: no group
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        AppConfig(engine={"tensor_parallel_size": 0})


def test_a_size_that_does_not_divide_the_heads_is_refused_before_any_replica_starts(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 4 must divide the attention heads \(4\), the KV "
                                         r"heads \(2\) and the MLP width \(176\); choose a divisor of 2"):
        prepare_config({"model_dir": str(tiny_model_dir), "adapter_store_dir": str(tmp_path),
                        "engine": {"tensor_parallel_size": 4}})
    assert prepare_config({"model_dir": str(tiny_model_dir), "adapter_store_dir": str(tmp_path),
                           "engine": {"tensor_parallel_size": 2}}).engine.tensor_parallel_size == 2


def test_the_request_path_runs_user_code_and_routing_on_the_replica_loop_unless_the_operator_says_otherwise(
        monkeypatch):
    """Ingress and Decoder replicas get RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and
    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 (no cross-thread hop per request and streamed item), merged into
    the app's runtime_env; a value exported where the app is built wins."""
    from vlora.deployments.app import hot_path_env

    monkeypatch.delenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", raising=False)
    monkeypatch.delenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", raising=False)
    main_loop = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
    assert hot_path_env() == main_loop
    config = AppConfig()
    rc = _deployment(Decoder, "Decoder", config.decoder, env=hot_path_env())._replica_config
    assert rc.ray_actor_options["runtime_env"] == {"env_vars": main_loop}
    assert "runtime_env" not in decoder_deployment(config)._replica_config.ray_actor_options  # no env: none set
    monkeypatch.setenv("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "1")
    monkeypatch.setenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "1")
    assert hot_path_env() == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}
