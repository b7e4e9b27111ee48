"""Serve's autoscaling_config passes through each deployment's config (queue-based scaling of the Decoder)."""

from __future__ import annotations

import pytest


def test_autoscaling_config_passes_through_to_serve():
    from pydantic import ValidationError

    from vlora.deployments.app import _deployment
    from vlora.deployments.config import AppConfig
    from vlora.deployments.decoder import Decoder
    from vlora.deployments.placement import gpu_shares

    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32, "upscale_delay_s": 5}
    cfg = AppConfig(decoder={"autoscaling_config": scaling})
    dep = _deployment(Decoder, "Decoder", cfg.decoder)
    auto = dep._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests, auto.upscale_delay_s) == (1, 4, 32, 5)
    assert (cfg.decoder.min_replicas, cfg.decoder.max_replicas) == (1, 4)
    assert gpu_shares(cfg, 2.0)["decoder"] == pytest.approx((2.0 - 0.1 - 0.2) / 4)  # room for the most replicas
    fixed = _deployment(Decoder, "Decoder", AppConfig(decoder={"num_replicas": 3}).decoder)
    assert fixed._deployment_config.autoscaling_config is None and fixed.num_replicas == 3
    for bad, msg in (({"min_replica": 1}, r"unknown autoscaling_config keys \['min_replica'\]"),
                     ({"min_replicas": 5, "max_replicas": 2}, "max_replicas")):
        with pytest.raises(ValidationError, match=msg):
            AppConfig(decoder={"autoscaling_config": bad})
