"""Image loading, validation and Qwen2.5-VL preprocessing (smart_resize + normalize + patchify).

Two jobs, both on the request path of the Preprocessor:

* `load_image` turns what a client sent (data URL, raw base64, allow-listed local file, http(s)
  URL) into an upright PIL image, refusing anything that would hurt the server: oversized
  bodies, decompression bombs, truncated files, paths outside the allow-list. Every refusal is
  an `ImageError` whose message says what is wrong and what to send instead.
* `ImageTransform` produces exactly what HF's `Qwen2VLImageProcessorPil` produces
  (`pixel_values` equal to the bit, same `grid_thw`), about 3x faster on 448x448: patchify is
  one byte transpose before any float exists, and rescale+normalize is one float32 pass whose
  equality with HF's op order is proven over all 256 input values when the transform is built.

No Ray import: the Preprocessor deployment wraps this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# OpenAI CLIP normalisation: HF's default for the Qwen2-VL image processor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_ASPECT_RATIO = 200  # HF's smart_resize refuses anything more extreme

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BASE64_RE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_WHITESPACE_RE = re.compile(r"\s+")
# Shorter strings are treated as paths: the smallest real image is ~70 bytes (~96 base64 chars).
_MIN_RAW_BASE64_CHARS = 64


# ----------------------------------------------------------------------------- errors


class ImageError(ValueError):
    """A client-side image problem; the message says what is wrong and what to send instead."""


class ImageSourceError(ImageError):
    """The image could not be obtained: bad data URL, refused path, http disabled, fetch failed."""


class ImageDecodeError(ImageError):
    """The bytes are not a complete image: unknown format, truncated, corrupt or zero-sized."""


class ImageTooLargeError(ImageError):
    """Too many bytes, or too many pixels (decompression-bomb guard)."""


class ImageAspectRatioError(ImageError):
    """Wider or taller than the model accepts (long side / short side > 200)."""


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class ImageLoadPolicy:
    """What `load_image` may do on behalf of a client. Defaults suit a public endpoint."""

    max_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 16 * 1024 * 1024  # checked from the header, before decoding pixels
    allow_http: bool = True
    http_timeout_s: float = 10.0  # per network operation and for the whole download
    # Local files are refused unless they resolve (realpath) inside one of these directories.
    allowed_local_dirs: tuple[str, ...] = ()
    # Pillow plugins we trust with client bytes (EPS, for one, would run Ghostscript).
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
    # url -> bytes for http(s) sources (deployments/image_fetch.py); None refuses them.
    fetch: Callable[[str], bytes] | None = None

    def __post_init__(self):
        if self.max_bytes <= 0 or self.max_image_pixels <= 0 or self.http_timeout_s <= 0:
            raise ValueError("max_bytes, max_image_pixels and http_timeout_s must be positive")
        # A bare string would be iterated character by character: insist on a sequence of dirs.
        if isinstance(self.allowed_local_dirs, str):
            raise ValueError("allowed_local_dirs must be a tuple of directories, not a string")
        object.__setattr__(self, "allowed_local_dirs", tuple(str(d) for d in self.allowed_local_dirs))
        object.__setattr__(self, "allowed_formats", tuple(f.upper() for f in self.allowed_formats))


DEFAULT_LOAD_POLICY = ImageLoadPolicy()


def load_image(source: str, policy: ImageLoadPolicy = DEFAULT_LOAD_POLICY) -> Image.Image:
    """Load a client image as an upright, fully decoded PIL image (its mode is kept).

    `source` is a `data:image/...;base64,...` URL, raw base64, a local path or `file://` URL
    (only inside `policy.allowed_local_dirs`), or an http(s) URL. The EXIF orientation is
    applied as HF's `load_image` does. Mode conversion is left to `ImageTransform`, which
    composites transparency onto white the way HF's processor does.
    """
    return decode_image(read_image_bytes(source, policy), policy)


def read_image_bytes(source: str, policy: ImageLoadPolicy = DEFAULT_LOAD_POLICY) -> bytes:
    """The encoded bytes behind `source`, at most `policy.max_bytes` of them."""
    if not isinstance(source, str) or not source.strip():
        raise ImageSourceError("image source is empty; send a data:image/...;base64 URL or an http(s) URL")
    source = source.strip()
    head = source[:16].lower()
    if head.startswith("data:"):
        return _read_data_url(source, policy)
    if head.startswith(("http://", "https://")):
        return _read_http(source, policy)
    if head.startswith("file://"):
        return _read_local_file(_file_url_to_path(source), policy)
    if _SCHEME_RE.match(source):
        scheme = source.split("://", 1)[0]
        raise ImageSourceError(
            f"unsupported image URL scheme '{scheme}://'; use https://, a data:image/...;base64 URL or raw base64"
        )
    # A long path without dots is also valid base64: when local files are enabled, an existing
    # path wins (as in HF's load_image); `file://` URLs are never ambiguous.
    if _looks_like_base64(source) and not (policy.allowed_local_dirs and os.path.lexists(source)):
        return _decode_base64(source, policy, what="base64 image data")
    return _read_local_file(source, policy)


def decode_image(data: bytes, policy: ImageLoadPolicy = DEFAULT_LOAD_POLICY) -> Image.Image:
    """Decode encoded image bytes; header checks (size, pixels, aspect) run before any pixel is decoded."""
    return finish_decode(open_image(data, policy))


def open_image(data: bytes, policy: ImageLoadPolicy = DEFAULT_LOAD_POLICY) -> Image.Image:
    """Read only the header of encoded image bytes and check it (bytes, pixels, aspect); `img.size`
    is then known without decoding a pixel. `finish_decode` does the rest."""
    if not data:
        raise ImageDecodeError("image data is empty (0 bytes); send a complete PNG, JPEG or WebP file")
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(len(data), policy)
    try:
        img = Image.open(io.BytesIO(data), formats=policy.allowed_formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard fired while reading the header (its global MAX_IMAGE_PIXELS).
        raise ImageTooLargeError(
            f"image has too many pixels to decode safely (limit {policy.max_image_pixels}; {e}); send a smaller image"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            f"data is not an image in a supported format ({', '.join(policy.allowed_formats)}); "
            "send a PNG, JPEG or WebP file"
        ) from e
    except Exception as e:  # Pillow raises OSError/SyntaxError/struct.error/... on broken headers
        raise ImageDecodeError(f"image header is corrupt ({e}); re-encode the image and send it again") from e

    width, height = img.size
    if width * height > policy.max_image_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{policy.max_image_pixels}; send a smaller image"
        )
    check_aspect_ratio(height, width)  # also refuses zero-sized images
    return img


def finish_decode(img: Image.Image) -> Image.Image:
    """Decode the pixels of an `open_image` result and apply its EXIF orientation."""
    try:
        # NOTE: a full decode, with ImageFile.LOAD_TRUNCATED_IMAGES left False, is what makes
        # truncated files fail here instead of reaching the model as half-grey images.
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as e:
        raise ImageDecodeError(
            f"image data is truncated or corrupt ({e}); re-encode the image and send the complete file"
        ) from e
    return img


def _too_many_bytes(num_bytes: int, policy: ImageLoadPolicy, approx: bool = False) -> ImageTooLargeError:
    about = "about " if approx else ""
    return ImageTooLargeError(
        f"image data is {about}{num_bytes} bytes, above the limit of {policy.max_bytes} bytes; "
        "send a smaller or more compressed image"
    )


def _looks_like_base64(source: str) -> bool:
    compact = _WHITESPACE_RE.sub("", source)
    return len(compact) >= _MIN_RAW_BASE64_CHARS and _BASE64_RE.fullmatch(compact) is not None


def _decode_base64(text: str, policy: ImageLoadPolicy, what: str) -> bytes:
    compact = _WHITESPACE_RE.sub("", text)
    if len(compact) * 3 // 4 > policy.max_bytes:  # refuse before allocating the decoded copy
        raise _too_many_bytes(len(compact) * 3 // 4, policy, approx=True)
    compact += "=" * (-len(compact) % 4)  # tolerate stripped padding
    try:
        if "-" in compact or "_" in compact:
            return base64.b64decode(compact, altchars=b"-_", validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageSourceError(f"{what} is not valid base64 ({e}); encode the file bytes with base64") from e


def _read_data_url(url: str, policy: ImageLoadPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageSourceError("data URL has no ',' before its payload; expected data:image/png;base64,<data>")
    media_type, *params = header[len("data:") :].split(";")
    media_type = media_type.strip().lower()
    if not media_type.startswith("image/"):
        raise ImageSourceError(
            f"data URL has media type '{media_type[:40]}', not image/*; expected data:image/png;base64,<data>"
        )
    if "base64" not in (p.strip().lower() for p in params):
        raise ImageSourceError("data URL is not base64-encoded; expected data:image/png;base64,<data>")
    return _decode_base64(payload, policy, what="data URL payload")


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageSourceError(f"file URL names a remote host '{parsed.netloc[:60]}'; only local files can be read")
    return urllib.parse.unquote(parsed.path)


def _is_inside(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # different drives on Windows
        return False


def _read_local_file(path: str, policy: ImageLoadPolicy) -> bytes:
    shown = path if len(path) <= 200 else path[:200] + "..."
    if not policy.allowed_local_dirs:
        raise ImageSourceError(
            f"'{shown}' was read as a local file path, and local image files are disabled on this server; "
            "send the image as a data:image/...;base64 URL or an http(s) URL"
        )
    # realpath resolves '..' and every symlink, so neither can lead outside the allowed dirs.
    real = os.path.realpath(path)
    if not any(_is_inside(real, os.path.realpath(d)) for d in policy.allowed_local_dirs):
        raise ImageSourceError(
            f"image path '{shown}' is outside the server's allowed image directories; "
            "use a file inside them or send the image as a data URL"
        )
    # O_NOFOLLOW: the resolved final component must not have become a symlink since realpath.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError as e:
        raise ImageSourceError(f"image file '{shown}' does not exist; check the path") from e
    except OSError as e:
        raise ImageSourceError(f"image file '{shown}' cannot be opened ({e.strerror}); check the path") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageSourceError(f"image path '{shown}' is not a regular file; name an image file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > policy.max_bytes:
            raise _too_many_bytes(st.st_size, policy)
        data = f.read(policy.max_bytes + 1)  # the file may have grown since fstat
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(len(data), policy)
    return data


def _read_http(url: str, policy: ImageLoadPolicy) -> bytes:
    """http(s) URLs go to the caller's fetcher (network I/O and address checks live beside the
    Preprocessor, not in the engine); without one they are refused."""
    if not policy.allow_http or policy.fetch is None:
        raise ImageSourceError(
            "fetching images over http(s) is disabled on this server; send the image as a data:image/...;base64 URL"
        )
    data = policy.fetch(url)
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(len(data), policy)
    return data


# ----------------------------------------------------------------------------- transform


def check_aspect_ratio(height: int, width: int) -> None:
    """Refuse what HF's smart_resize refuses (long/short > 200), with a message that says so."""
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image is {width}x{height} pixels (zero-sized); send an image with content")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageAspectRatioError(
            f"image is {width}x{height}, an aspect ratio of {ratio:.1f}, above the limit of {MAX_ASPECT_RATIO}; "
            "crop or pad it to a less extreme shape"
        )


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(height, width) divisible by `factor`, pixel count within [min, max], aspect kept: HF's math exactly."""
    check_aspect_ratio(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way HF's processor does it: anything with alpha (or a transparency key) over white."""
    if img.mode == "RGB" and img.info.get("transparency") is None:
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True, slots=True)
class ProcessedImage:
    """One image, ready for the vision encoder.

    `content_hash` keys the embedding cache: SHA-256 over the resized RGB pixels, their grid and
    the transform's settings (patch/merge sizes, mean/std, rescale), so equal hashes mean equal
    `pixel_values`, whatever file format or mode the client sent.
    """

    pixel_values: torch.Tensor  # float32 [grid_t * grid_h * grid_w, 3 * temporal * patch * patch]
    grid_thw: tuple[int, int, int]
    content_hash: str
    num_image_tokens: int  # placeholders in the prompt: t * h * w // merge_size**2


class ImageTransform:
    """Qwen2-VL image preprocessing, equal to HF's `Qwen2VLImageProcessorPil` to the bit, faster.

    HF resizes, then rescales and normalizes float arrays in several generic passes, then
    patchifies. Here the uint8 pixels are put in patch order first (one cheap byte transpose),
    then turned into floats in one pass, then copied `temporal_patch_size` times.

    Every output float is a function of one uint8 value and its channel, so the 3x256 table
    computed with HF's exact op order (float64 rescale, float32 cast, float32 subtract/divide)
    defines the whole transform. The fast float32 arithmetic path is used only when it
    reproduces that table bit for bit (checked at construction); otherwise the table is
    gathered directly.
    """

    def __init__(
        self,
        *,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] | float = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] | float = OPENAI_CLIP_STD,
        rescale_factor: float = 1 / 255,
        do_rescale: bool = True,
        do_normalize: bool = True,
        resample: int = Image.Resampling.BICUBIC,
    ):
        if min(min_pixels, max_pixels, patch_size, temporal_patch_size, merge_size) <= 0 or min_pixels > max_pixels:
            raise ValueError(
                f"invalid image transform sizes: min_pixels={min_pixels} max_pixels={max_pixels} "
                f"patch_size={patch_size} temporal_patch_size={temporal_patch_size} merge_size={merge_size}"
            )
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.factor = self.patch_size * self.merge_size
        self.resample = Image.Resampling(int(resample))
        mean = _per_channel(image_mean, "image_mean")
        std = _per_channel(image_std, "image_std")

        # HF: rescale in float64 then cast to float32; normalize in float32 ((x - mean) / std).
        values = np.arange(256, dtype=np.float64)
        scaled = (values * rescale_factor if do_rescale else values).astype(np.float32)
        if do_normalize:
            lut = (scaled[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
        else:
            lut = np.broadcast_to(scaled, (3, 256))
        self._lut = np.ascontiguousarray(lut, dtype=np.float32)  # [3, 256]

        # The arithmetic path: x / divisor, then (x - mean) / std, all float32. For 1/255 it is
        # exact (u/255 is never near a float32 rounding tie), but the table is the judge.
        # numpy, not torch: single-threaded and predictable on a busy CPU replica.
        self._divisor = np.float32(1 / rescale_factor if do_rescale else 1.0)
        self._mean = np.asarray(mean if do_normalize else (0.0,) * 3, dtype=np.float32).reshape(1, 3, 1)
        self._std = np.asarray(std if do_normalize else (1.0,) * 3, dtype=np.float32).reshape(1, 3, 1)
        every_value = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, 3, 256))
        self.uses_arithmetic = np.array_equal(self._normalize_arithmetic(every_value)[0], self._lut)

        settings = dict(
            patch=self.patch_size, temporal=self.temporal_patch_size, merge=self.merge_size,
            lut=hashlib.sha256(self._lut.tobytes()).hexdigest(),
        )  # fmt: skip
        self._hash_prefix = ("vlora-image-v1|" + json.dumps(settings, sort_keys=True)).encode()

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> ImageTransform:
        """Build from a checkpoint folder's `preprocessor_config.json`, read as HF reads it."""
        path = Path(model_dir) / "preprocessor_config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path} not found; is {model_dir} a Qwen2-VL checkpoint folder?") from e
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: dict) -> ImageTransform:
        """HF precedence: top-level min_pixels/max_pixels override size.shortest_edge/longest_edge."""
        for flag in ("do_resize", "do_convert_rgb"):
            if config.get(flag, True) is False:
                raise ValueError(f"preprocessor config sets {flag}=false; Qwen2-VL preprocessing needs it true")
        size = config.get("size") or {}
        min_pixels = _first_set(config.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"), 56 * 56)
        max_pixels = _first_set(
            config.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"), 28 * 28 * 1280
        )
        optional = {
            key: config[key]
            for key in (
                "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                "rescale_factor", "do_rescale", "do_normalize", "resample",
            )
            if config.get(key) is not None
        }  # fmt: skip
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **optional)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """The patch grid an image of this size gets, without touching its pixels (EXIF rotation
        swaps h and w, which leaves the number of prompt tokens unchanged)."""
        resized_h, resized_w = self.resized_size(height, width)
        return 1, resized_h // self.patch_size, resized_w // self.patch_size

    def num_image_tokens(self, height: int, width: int) -> int:
        """Prompt placeholders for an image of this size, without touching its pixels."""
        resized_h, resized_w = self.resized_size(height, width)
        return (resized_h // self.patch_size) * (resized_w // self.patch_size) // self.merge_size**2

    def __call__(self, img: Image.Image) -> ProcessedImage:
        return self.transform(img)

    def transform(self, img: Image.Image) -> ProcessedImage:
        """PIL image (any mode) -> pixel patches in HF's layout, grid, content hash."""
        resized_h, resized_w = self.resized_size(img.height, img.width)
        rgb = to_rgb(img).resize((resized_w, resized_h), resample=self.resample)
        pixels = np.asarray(rgb)  # [H, W, 3] uint8, C-contiguous

        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = resized_h // p, resized_w // p
        num_patches = grid_h * grid_w
        # HF's row order over patches is (merge-block row, merge-block col, row in block, col in
        # block); within a patch it is (channel, frame, y, x). Reordering uint8 pixels moves a
        # quarter of the bytes HF's float transpose moves.
        patch_order = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        patch_order = patch_order.reshape(num_patches, 3, p * p)
        if self.uses_arithmetic:
            normalized = self._normalize_arithmetic(patch_order)
        else:
            normalized = self._normalize_by_table(patch_order)
        # A still image is one frame repeated to fill the temporal patch, as HF does.
        pixel_values = np.empty((num_patches, 3, t, p * p), dtype=np.float32)
        pixel_values[:] = normalized[:, :, None, :]

        digest = hashlib.sha256(self._hash_prefix)
        digest.update(f"|{resized_h}x{resized_w}|".encode())
        digest.update(pixels.data)
        return ProcessedImage(
            pixel_values=torch.from_numpy(pixel_values.reshape(num_patches, 3 * t * p * p)),
            grid_thw=(1, grid_h, grid_w),
            content_hash=digest.hexdigest(),
            num_image_tokens=num_patches // m**2,
        )

    def _normalize_arithmetic(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, 3, k] -> float32 [n, 3, k] in float32 arithmetic, in place after one cast."""
        values = pixels.astype(np.float32)
        values /= self._divisor
        values -= self._mean
        values /= self._std
        return values

    def _normalize_by_table(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, 3, k] -> float32 [n, 3, k] by gathering from the HF-exact table."""
        out = np.empty(pixels.shape, dtype=np.float32)
        for channel in range(3):
            np.take(self._lut[channel], pixels[:, channel], out=out[:, channel], mode="clip")
        return out


def _first_set(*values):
    return next(v for v in values if v is not None)


def _per_channel(value: Sequence[float] | float, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(values)}")
    return values
