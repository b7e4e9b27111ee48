"""The VisionEncoder deployment class without Serve: a batch of requests -> one tower forward, each
request exactly its own embeddings (the Serve side, @serve.batch, is tests/e2e/test_vision_batching.py)."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlora.deployments.config import AppConfig
from vlora.deployments.messages import PreparedRequest
from vlora.deployments.preprocessor import Preprocessor
from vlora.deployments.vision_encoder import VisionEncoderDeployment, chunk_by_patches

TOL = 1e-5


def data_url(seed: int, h: int, w: int) -> str:
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(*urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "hi"}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return AppConfig(model_dir=str(tiny_model_dir))


@pytest.fixture(scope="module")
def pre(config):
    return Preprocessor(config)


def prepare(pre, *urls) -> PreparedRequest:
    return asyncio.run(pre.prepare_chat(chat(*urls)))


def alone(vis: VisionEncoderDeployment, req: PreparedRequest) -> torch.Tensor:
    """The request's images encoded one at a time, straight through the engine: the expected embeddings."""
    return torch.cat([vis.encoder.encode([p], [g])[0] for p, g in zip(req.pixel_values, req.prompt.image_grids)])


def test_chunk_by_patches():
    assert chunk_by_patches([4, 4, 4], 8) == [[0, 1], [2]]
    assert chunk_by_patches([10, 2, 3], 8) == [[0], [1, 2]]  # an image over the bound runs alone
    assert chunk_by_patches([1, 1, 1], 100) == [[0, 1, 2]]
    assert chunk_by_patches([], 8) == []


def test_a_batch_of_requests_is_one_forward_and_each_gets_its_own_embeddings(config, pre):
    vis = VisionEncoderDeployment(config)
    a, b, c = data_url(1, 64, 96), data_url(2, 120, 80), data_url(3, 97, 301)
    reqs = [prepare(pre, a), prepare(pre, b, c), prepare(pre, c, a), prepare(pre, b)]
    out = vis._encode_requests(reqs)
    # three distinct images over four requests: one forward, each image encoded once
    assert vis.encoder.num_forwards == 1 and vis.encoder.num_images == 3
    assert vis.cache.stats()["misses"] == 3
    stats = asyncio.run(vis.stats())
    assert stats["num_batches"] == 1 and stats["recent_batch_sizes"] == [4] and stats["num_forwards"] == 1
    for req, enc in zip(reqs, out):
        assert enc.prompt is req.prompt
        assert enc.image_embeds.dtype == vis.encoder.dtype
        expected = alone(vis, req)
        assert enc.image_embeds.shape == expected.shape
        assert (enc.image_embeds - expected).abs().max().item() <= TOL


def test_cached_images_skip_the_tower(config, pre):
    vis = VisionEncoderDeployment(config)
    a, b = data_url(4, 64, 64), data_url(5, 80, 64)
    first = vis._encode_requests([prepare(pre, a)])[0]
    again = vis._encode_requests([prepare(pre, a), prepare(pre, a, b)])
    assert vis.encoder.num_forwards == 2 and vis.encoder.num_images == 2  # b only, in the second forward
    assert torch.equal(again[0].image_embeds, first.image_embeds)
    assert torch.equal(again[1].image_embeds[: first.image_embeds.shape[0]], first.image_embeds)


def test_patch_bound_splits_a_batch_into_forwards(config, pre):
    vis = VisionEncoderDeployment(config.model_copy(update={
        "vision_encoder": config.vision_encoder.model_copy(update={"max_batch_patches": 300})}))
    reqs = [prepare(pre, data_url(10 + i, 224, 224)) for i in range(3)]  # 256 patches each
    out = vis._encode_requests(reqs)
    assert vis.encoder.num_forwards == 3 and vis.num_batches == 1
    for req, enc in zip(reqs, out):
        assert (enc.image_embeds - alone(vis, req)).abs().max().item() <= TOL


def test_a_bad_request_fails_alone(config, pre):
    vis = VisionEncoderDeployment(config)
    good = prepare(pre, data_url(20, 64, 64))
    bad = prepare(pre, data_url(21, 64, 64))
    bad.pixel_values[0] = bad.pixel_values[0][:-4]
    out = vis._encode_requests([bad, good])
    assert isinstance(out[0], ValueError) and "do not match grid" in str(out[0])
    assert (out[1].image_embeds - alone(vis, good)).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="do not match grid"):
        asyncio.run(vis.encode(bad))


def test_text_only_request_skips_the_tower(config, pre):
    vis = VisionEncoderDeployment(config)
    req = asyncio.run(pre.prepare_chat([{"role": "user", "content": "hello"}]))
    enc = asyncio.run(vis.encode(req))
    assert enc.image_embeds is None and vis.encoder.num_forwards == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embeddings_travel_as_numpy_and_arrive_unchanged(pre, dtype):
    """Ray reads numpy out of its object store without a copy; the Decoder gets the same dtype and values."""
    import pickle

    from vlora.deployments.messages import EncodedRequest

    req = prepare(pre, data_url(30, 64, 64))
    emb = torch.randn(16, 64).to(dtype)
    msg = EncodedRequest(req.prompt, emb)
    _, (prompt, (dtype_name, array)) = msg.__reduce__()
    assert isinstance(array, np.ndarray) and array.nbytes == emb.numel() * emb.element_size()
    got = pickle.loads(pickle.dumps(msg, protocol=5))
    assert got.image_embeds.dtype == dtype and torch.equal(got.image_embeds, emb)
    assert got.prompt.token_ids == req.prompt.token_ids
    assert pickle.loads(pickle.dumps(EncodedRequest(req.prompt, None))).image_embeds is None
