"""engine.images: HF parity of the transform (to 1e-6, in practice bit-equal) and the loader's refusals.

The oracle is HF's `Qwen2VLImageProcessorPil` fed the same PIL image; EXIF cases also go
through HF's `load_image` from the same bytes. Every refusal is checked for its error type
and for the words that tell the client what to fix.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlora.engine.images import (
    ImageAspectRatioError,
    ImageDecodeError,
    ImageError,
    ImageLoadPolicy,
    ImageSourceError,
    ImageTooLargeError,
    ImageTransform,
    load_image,
    smart_resize,
)

ORIENTATION = 0x0112  # the EXIF tag


# ----------------------------------------------------------------------------- helpers


def noisy_gradient(height: int, width: int, seed: int) -> np.ndarray:
    """[H, W, 3] uint8: a colour gradient under noise, so resampling and every channel matter."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float64)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float64)[None, :]
    gradient = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1) * 255
    noise = rng.normal(0, 45, size=(height, width, 3))
    return np.clip(gradient + noise, 0, 255).astype(np.uint8)


def rgb(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(noisy_gradient(height, width, seed))


def with_alpha(img: Image.Image, mode: str, seed: int) -> Image.Image:
    alpha = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (img.height, img.width), dtype=np.uint8))
    base = img.convert(mode[:-1])  # "RGBA" -> RGB, "LA" -> L
    return Image.merge(mode, (*base.split(), alpha))


def palette_with_transparency(height: int, width: int, seed: int) -> Image.Image:
    img = rgb(height, width, seed).quantize(colors=32, method=Image.Quantize.MEDIANCUT)
    img.info["transparency"] = 3
    return img


def rgb_with_transparent_colour(height: int, width: int, seed: int) -> Image.Image:
    img = rgb(height, width, seed)
    img.info["transparency"] = tuple(int(v) for v in np.asarray(img)[0, 0])
    return img


def cmyk(height: int, width: int, seed: int) -> Image.Image:
    planes = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.frombytes("CMYK", (width, height), planes.tobytes())


def uint16_gray(height: int, width: int, seed: int) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 2**16, (height, width), dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    return img


def encode(img: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds no pixel data: decoding it would fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def assert_same_as_hf(ours, hf_out) -> None:
    assert ours.grid_thw == tuple(hf_out["image_grid_thw"][0].tolist())
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == hf_out["pixel_values"].shape
    assert (ours.pixel_values - hf_out["pixel_values"]).abs().max().item() <= 1e-6
    t, h, w = ours.grid_thw
    assert ours.num_image_tokens == t * h * w // 4


# ----------------------------------------------------------------------------- transform parity

PARITY_CASES = {
    "rgb-10x10-upscaled-to-min-pixels": lambda: rgb(10, 10, 1),
    "rgb-28x28": lambda: rgb(28, 28, 2),
    "rgb-448x448": lambda: rgb(448, 448, 3),
    "rgb-1000x300": lambda: rgb(300, 1000, 4),
    "rgb-33x777": lambda: rgb(777, 33, 5),
    "rgb-4000x25-very-wide": lambda: rgb(25, 4000, 6),
    "rgb-1200x900-above-max-pixels": lambda: rgb(900, 1200, 7),
    "rgb-200x1-aspect-exactly-200": lambda: rgb(1, 200, 8),
    "rgb-29x31-odd": lambda: rgb(31, 29, 9),
    "rgb-56x56": lambda: rgb(56, 56, 10),
    "rgba-64x64": lambda: with_alpha(rgb(64, 64, 11), "RGBA", 12),
    "rgba-300x200": lambda: with_alpha(rgb(200, 300, 13), "RGBA", 14),
    "l-123x456": lambda: rgb(456, 123, 15).convert("L"),
    "la-100x100": lambda: with_alpha(rgb(100, 100, 16), "LA", 17),
    "p-200x150": lambda: rgb(150, 200, 18).quantize(colors=64),
    "p-transparency-77x91": lambda: palette_with_transparency(91, 77, 19),
    "rgb-transparent-colour-45x45": lambda: rgb_with_transparent_colour(45, 45, 20),
    "cmyk-150x150": lambda: cmyk(150, 150, 21),
    "bilevel-100x80": lambda: rgb(80, 100, 22).convert("1"),
    "i16-64x48": lambda: uint16_gray(48, 64, 23),
    "ycbcr-90x60": lambda: rgb(60, 90, 24).convert("YCbCr"),
}


@pytest.fixture(scope="module")
def transform(tiny_model_dir):
    return ImageTransform.from_pretrained(tiny_model_dir)


def test_from_pretrained_reads_the_tiny_checkpoint(transform, hf_image_processor):
    assert (transform.min_pixels, transform.max_pixels) == (3136, 200704)
    assert transform.min_pixels == hf_image_processor.size["shortest_edge"]
    assert transform.max_pixels == hf_image_processor.size["longest_edge"]
    assert (transform.patch_size, transform.temporal_patch_size, transform.merge_size) == (14, 2, 2)


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_transform_matches_hf_processor(case, transform, hf_image_processor):
    img = PARITY_CASES[case]()
    ours = transform(img)
    assert_same_as_hf(ours, hf_image_processor(img, return_tensors="pt"))
    assert ours.pixel_values.shape[1] == 3 * 2 * 14 * 14


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_hf_load_image(orientation, transform, hf_image_processor, tmp_path):
    from transformers.image_utils import load_image as hf_load_image

    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    fmt = "JPEG" if orientation % 2 else "PNG"  # both carriers of EXIF
    data = encode(rgb(40, 96, 30 + orientation), fmt, exif=exif.tobytes())
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    path.write_bytes(data)

    ours_img = load_image(data_url(data, f"image/{fmt.lower()}"))
    assert ours_img.size == ((40, 96) if orientation >= 5 else (96, 40))  # 5-8 swap the axes
    ours = transform(ours_img)
    from_path = transform(load_image(str(path), ImageLoadPolicy(allowed_local_dirs=(str(tmp_path),))))
    assert ours.content_hash == from_path.content_hash

    for hf_img in (hf_load_image(str(path)), hf_load_image(base64.b64encode(data).decode())):
        assert_same_as_hf(ours, hf_image_processor(hf_img, return_tensors="pt"))


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_png_with_transparency_through_the_loader(mode, transform, hf_image_processor):
    """Transparency survives loading, and is composited onto white like HF's processor does."""
    img = with_alpha(rgb(70, 50, 40), "RGBA", 41) if mode == "RGBA" else palette_with_transparency(70, 50, 42)
    loaded = load_image(data_url(encode(img, "PNG")))
    assert loaded.mode == mode
    assert_same_as_hf(transform(loaded), hf_image_processor(loaded, return_tensors="pt"))


REAL_CONFIG = {  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
RECENT_HF_CONFIG = {  # what recent HF versions save: pixel bounds under "size"
    **{k: v for k, v in REAL_CONFIG.items() if k not in ("min_pixels", "max_pixels")},
    "size": {"shortest_edge": 3136, "longest_edge": 12845056},
    "rescale_factor": 0.00392156862745098,
    "resample": 3,
}


@pytest.mark.parametrize("config", [REAL_CONFIG, RECENT_HF_CONFIG], ids=["min-max-pixels", "size-dict"])
def test_real_checkpoint_config_matches_hf(config, tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = ImageTransform.from_pretrained(tmp_path)
    hf = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert (ours.min_pixels, ours.max_pixels) == (3136, 12845056)
    for img in (rgb(300, 1000, 50), rgb(900, 1200, 51), with_alpha(rgb(777, 33, 52), "RGBA", 53)):
        assert_same_as_hf(ours(img), hf(img, return_tensors="pt"))


@pytest.mark.parametrize(
    "settings, uses_arithmetic",
    [
        ({"rescale_factor": 0.0037}, False),  # float32 division cannot reproduce it: table path
        ({"rescale_factor": 1 / 127.5, "image_mean": 0.5, "image_std": 0.5}, True),
        ({"do_normalize": False}, True),
        ({"do_rescale": False, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 1}, True),
    ],
)
def test_other_normalizations_match_hf(settings, uses_arithmetic):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ours = ImageTransform(min_pixels=3136, max_pixels=200704, **settings)
    hf = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=200704, **settings)
    assert ours.uses_arithmetic == uses_arithmetic
    for img in (rgb(300, 1000, 55), with_alpha(rgb(64, 64, 56), "RGBA", 57)):
        out = ours(img)
        expected = hf(img, return_tensors="pt")
        assert out.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
        assert torch.equal(out.pixel_values, expected["pixel_values"])


def test_smart_resize_matches_hf_on_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(60)
    sizes = [(1, 1), (1, 200), (200, 1), (27, 29), (5000, 5000)] + [
        tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(500)
    ]
    for height, width in sizes:
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in ((3136, 200704), (3136, 12845056)):
            assert smart_resize(height, width, 28, min_pixels, max_pixels) == hf_smart_resize(
                height, width, 28, min_pixels, max_pixels
            ), (height, width, min_pixels, max_pixels)


def test_aspect_ratio_above_200_is_refused_like_hf(transform, hf_image_processor):
    img = rgb(1, 201, 70)
    with pytest.raises(ImageAspectRatioError, match=r"201x1.*aspect ratio of 201\.0.*limit of 200.*crop or pad"):
        transform(img)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_image_processor(img, return_tensors="pt")
    with pytest.raises(ImageAspectRatioError, match="aspect ratio"):
        load_image(data_url(encode(img, "PNG")))
    with pytest.raises(ImageAspectRatioError):
        load_image(data_url(encode(rgb(250, 1, 71), "PNG")))


def test_zero_width_image_is_refused(transform):
    with pytest.raises(ImageDecodeError, match=r"0x10 pixels \(zero-sized\)"):
        transform(Image.new("RGB", (0, 10)))


# ----------------------------------------------------------------------------- content hash


def test_content_hash_identifies_the_pixels(transform, tiny_model_dir):
    img = rgb(120, 90, 80)
    first, again = transform(img), transform(img.copy())
    assert first.content_hash == again.content_hash and len(first.content_hash) == 64

    gray = rgb(120, 90, 81).convert("L")
    as_gray, as_rgb = transform(gray), transform(gray.convert("RGB"))
    assert as_gray.content_hash == as_rgb.content_hash  # same pixels whatever the mode sent
    assert torch.equal(as_gray.pixel_values, as_rgb.pixel_values)

    changed = np.asarray(img).copy()
    changed[60, 45, 1] ^= 1
    assert transform(Image.fromarray(changed)).content_hash != first.content_hash

    other_norm = ImageTransform(min_pixels=3136, max_pixels=200704, image_mean=0.5, image_std=0.5)
    assert other_norm(img).content_hash != first.content_hash


def test_num_image_tokens_without_pixels(transform):
    assert transform.num_image_tokens(448, 448) == 256
    assert transform.num_image_tokens(900, 1200) == transform(rgb(900, 1200, 90)).num_image_tokens


# ----------------------------------------------------------------------------- loading


def test_load_sources_all_give_the_same_image(tmp_path):
    img = rgb(33, 47, 100)
    data = encode(img, "PNG")
    path = tmp_path / "img.png"
    path.write_bytes(data)
    policy = ImageLoadPolicy(allowed_local_dirs=(str(tmp_path),))
    raw_b64 = base64.b64encode(data).decode()
    for source in (data_url(data), raw_b64, str(path), path.as_uri(), f"  {data_url(data)}\n"):
        loaded = load_image(source, policy)
        assert loaded.size == (47, 33)
        assert np.array_equal(np.asarray(loaded), np.asarray(img))


def test_not_an_image_is_refused():
    with pytest.raises(ImageDecodeError, match="not an image in a supported format.*send a PNG"):
        load_image(data_url(b"hello, this is plain text and not a picture at all"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # would run Ghostscript
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_image(data_url(eps))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused(fmt):
    data = encode(rgb(120, 160, 110), fmt)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt.*complete file"):
        load_image(data_url(data[: len(data) * 2 // 3]))


def test_empty_and_zero_sized_images_are_refused():
    with pytest.raises(ImageDecodeError, match=r"empty \(0 bytes\)"):
        load_image("data:image/png;base64,")
    with pytest.raises(ImageDecodeError):  # a PNG header with width 0: Pillow cannot identify it
        load_image(data_url(png_header_only(0, 10)))


def test_pixel_bomb_is_refused_before_decoding():
    # Above our 16 MP limit and below Pillow's own guard: our header check must catch it.
    # The file holds no pixel data, so reaching the decoder would give a decode error instead.
    with pytest.raises(ImageTooLargeError, match=r"9000x8000 = 72000000 pixels, above the limit of 16777216"):
        load_image(data_url(png_header_only(9000, 8000)))
    # Far above Pillow's guard: Pillow refuses while reading the header; still our error type.
    with pytest.raises(ImageTooLargeError, match="pixels.*smaller image"):
        load_image(data_url(png_header_only(30000, 30000)))
    small_limit = ImageLoadPolicy(max_image_pixels=100 * 100)
    with pytest.raises(ImageTooLargeError, match="101x100 = 10100 pixels"):
        load_image(data_url(encode(rgb(100, 101, 120), "PNG")), small_limit)


def test_too_many_bytes_is_refused():
    data = encode(rgb(64, 64, 130), "PNG")
    with pytest.raises(ImageTooLargeError, match=r"bytes, above the limit of 1000 bytes"):
        load_image(data_url(data), ImageLoadPolicy(max_bytes=1000))


@pytest.mark.parametrize(
    "source, words",
    [
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
        ("data:image/png,rawbytes", "not base64-encoded"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,@@@@not*base64!!", "not valid base64"),
        ("ftp://example.com/cat.png", "unsupported image URL scheme 'ftp://'"),
        ("   ", "empty"),
    ],
)
def test_bad_sources_are_refused(source, words):
    with pytest.raises(ImageSourceError, match=words):
        load_image(source)


def test_local_files_are_only_read_inside_the_allow_list(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(encode(rgb(20, 20, 140), "PNG"))
    (allowed / "ok.png").write_bytes(encode(rgb(20, 20, 141), "PNG"))
    os.symlink(outside / "secret.png", allowed / "link.png")
    policy = ImageLoadPolicy(allowed_local_dirs=(str(allowed),))

    assert load_image(str(allowed / "ok.png"), policy).size == (20, 20)
    for refused in (
        str(outside / "secret.png"),
        f"{allowed}/../outside/secret.png",  # '..' traversal
        (allowed / ".." / "outside" / "secret.png").as_uri(),
        str(allowed / "link.png"),  # symlink out of the allowed dir
        "/etc/passwd",
    ):
        with pytest.raises(ImageSourceError, match="outside the server's allowed image directories"):
            load_image(refused, policy)
    with pytest.raises(ImageSourceError, match="local image files are disabled"):
        load_image(str(allowed / "ok.png"))  # default policy: no local files at all
    with pytest.raises(ImageSourceError, match="does not exist"):
        load_image(str(allowed / "missing.png"), policy)
    with pytest.raises(ImageSourceError, match="not a regular file"):
        load_image(str(allowed), policy)


def test_errors_are_value_errors():
    assert issubclass(ImageError, ValueError)
    for cls in (ImageSourceError, ImageDecodeError, ImageTooLargeError, ImageAspectRatioError):
        assert issubclass(cls, ImageError)


def test_http_urls_go_to_the_policys_fetcher_or_are_refused():
    img = rgb(30, 50, 150)
    data = encode(img, "PNG")
    seen = []
    policy = ImageLoadPolicy(fetch=lambda url: seen.append(url) or data)
    assert np.array_equal(np.asarray(load_image("https://example.com/cat.png", policy)), np.asarray(img))
    assert seen == ["https://example.com/cat.png"]
    with pytest.raises(ImageSourceError, match="over http\\(s\\) is disabled"):
        load_image("https://example.com/cat.png")  # no fetcher: the engine never opens a socket
    with pytest.raises(ImageSourceError, match="over http\\(s\\) is disabled"):
        load_image("https://example.com/cat.png", ImageLoadPolicy(allow_http=False, fetch=lambda url: data))
    with pytest.raises(ImageTooLargeError, match="above the limit of 100 bytes"):
        load_image("https://example.com/cat.png", ImageLoadPolicy(max_bytes=100, fetch=lambda url: data))
