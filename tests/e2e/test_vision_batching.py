"""Through Serve: concurrent image requests to the VisionEncoder are encoded in one tower forward
(@serve.batch), and each caller gets exactly its own embeddings."""

from __future__ import annotations

import asyncio

import pytest
import torch

from vlora.deployments.app import _deployment, prepare_config
from vlora.deployments.preprocessor import Preprocessor
from vlora.deployments.vision_encoder import VisionEncoderDeployment
from vlora.engine.vision import VisionEncoder
from tests.e2e.conftest import base_config
from tests.e2e.test_serving import data_url, user

TOL = 1e-5
BATCH = 4


@pytest.fixture(scope="module")
def vision_app(serve_instance, tiny_model_dir, tmp_path_factory):
    """A VisionEncoder alone, batching up to BATCH requests; the long wait makes the batch fill by count."""
    from ray import serve

    config = prepare_config(base_config(tiny_model_dir, tmp_path_factory.mktemp("vstore"), vision_encoder={
        "max_batch_size": BATCH, "batch_wait_timeout_s": 30.0, "max_ongoing_requests": 16}))
    app = _deployment(VisionEncoderDeployment, "VisionEncoder", config.vision_encoder).bind(config)
    handle = serve.run(app, name="vision-batch", route_prefix=None)
    yield config, handle
    serve.delete("vision-batch")


def test_concurrent_requests_are_encoded_in_one_forward(vision_app, tiny_model_dir):
    config, handle = vision_app
    pre = Preprocessor(config)
    urls = [data_url(40 + i, 60 + 20 * i, 120 - 10 * i) for i in range(BATCH)]  # four sizes
    reqs = [asyncio.run(pre.prepare_chat(user("what?", [u]))) for u in urls]
    before = handle.stats.remote().result()
    responses = [handle.encode.remote(r) for r in reqs]  # in flight together
    results = [r.result(timeout_s=120) for r in responses]
    after = handle.stats.remote().result()

    assert after["num_batches"] - before["num_batches"] == 1
    assert after["recent_batch_sizes"][-1] == BATCH
    assert after["num_forwards"] - before["num_forwards"] == 1
    assert after["images_encoded"] - before["images_encoded"] == BATCH

    encoder = VisionEncoder.from_pretrained(tiny_model_dir)
    for req, enc in zip(reqs, results):
        (expected,) = encoder.encode(req.pixel_values, req.prompt.image_grids)
        assert enc.prompt.token_ids == req.prompt.token_ids
        assert enc.image_embeds.dtype == torch.float32 and enc.image_embeds.shape == expected.shape
        assert (enc.image_embeds - expected).abs().max().item() <= TOL
