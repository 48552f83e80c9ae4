"""Images for the vision-language models: from image bytes to pixel tensors, and the text that
stands for each image in a prompt.

- `load_image`: a file path, bytes or a ``data:image/...;base64,`` URL to an RGB Pillow image.
  PNG, JPEG and WebP only; the pixel count is read from the header and checked before any
  pixel is decoded; the EXIF orientation is applied (as transformers' ``load_image`` does) and
  transparency laid on white (as its image processors' ``convert_to_rgb`` does).
- `to_pixels`: lmforge's own small VLMs (SigLIP-style): one square, bicubic, scaled to [0, 1]
  and normalised, as transformers' ``SiglipImageProcessor`` does.
- `Idefics3Preprocess`: Idefics3 / SmolVLM, with exactly the tiles and prompt text of
  transformers' ``Idefics3ImageProcessor`` (its Pillow backend) and ``Idefics3Processor``: the
  longest edge resized to ``longest_edge``, the image cut into ``tile_size`` tiles plus a global
  view, and ``<image>`` in the prompt replaced by one run of ``image_seq_len`` tokens per tile.
- `ImageProcessor`: what every caller goes through, chosen per model by `image_processor`:
  ``prepare(image)`` gives the text that stands for the image in a prompt and its pixel tiles
  (``SquareView`` for lmforge's own models, ``Idefics3Preprocess`` for imported ones).

Every step that changes pixels calls the same Pillow resize on 8-bit images that transformers
calls, and the arithmetic after it is done in transformers' order and precision, so the tensors
agree to the last bit.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lmforge.config import VisionConfig, VLMConfig
from lmforge.errors import ConfigError, LmforgeError, UnsupportedModel
from lmforge.tokenizer import Tokenizer

FORMATS = ("PNG", "JPEG", "WEBP")
# More than any phone or camera photo needs (a 108 MP sensor saves 12 MP by default), while
# decoding one still fits in 150 MB; the models see at most a few megapixels of it anyway.
MAX_PIXELS = 50_000_000
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
# transformers resizes no image past this edge (its MAX_IMAGE_SIZE); keeping longest_edge at
# or below it means that cap never applies, so lmforge need not copy it.
_MAX_LONGEST_EDGE = 4096


class ImageError(LmforgeError, ValueError):
    """An image that cannot be used: missing, damaged, in a format lmforge does not read, or
    too large."""


def load_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The RGB image in ``source``: a file path, the file's bytes, or a data URL
    (``data:image/png;base64,...``). Refuses, with an ImageError, anything but a readable PNG,
    JPEG or WebP image of at most ``max_pixels`` pixels."""
    name, data = _read_source(source)
    with _open(name, data) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{name} is {width}x{height} = {width * height:,} pixels, more than "
                             f"the {max_pixels:,} allowed (max_pixels): scale it down first")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{name} is a damaged {image.format} image ({err}): "
                             "save it again or use another copy") from None
        return _to_rgb(ImageOps.exif_transpose(image))


def _read_source(source: str | os.PathLike | bytes) -> tuple[str, bytes | Path]:
    """How to name ``source`` in errors, and its bytes (or its path, read lazily by Pillow so
    that a huge file is refused from its header)."""
    if isinstance(source, (bytes, bytearray)):
        return "the image data", bytes(source)
    if isinstance(source, str) and source.startswith("data:"):
        return "the data URL", _data_url_bytes(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"{_shorten(source)}: lmforge does not download images; download it "
                         "and pass the file, or send it as a data:image/...;base64, URL")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            what = "a directory, not an image file" if path.is_dir() else "no such file"
            raise ImageError(f"{path}: {what}")
        return str(path), path
    raise ImageError("an image is given as a file path, bytes or a data:image/...;base64, URL, "
                     f"not a {type(source).__name__}")


def _data_url_bytes(url: str) -> bytes:
    """The bytes a ``data:image/...;base64,`` URL carries (RFC 2397, base64 form only)."""
    header, comma, payload = url.partition(",")
    media_type, *params = header[len("data:"):].split(";")
    if not comma:
        problem = "has no ',' before its data"
    elif not media_type.startswith("image/"):
        problem = f"holds {media_type or 'text/plain'}, not an image"
    elif "base64" not in params:
        problem = "is not base64-encoded (';base64' is missing)"
    else:
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as err:
            problem = f"has invalid base64 data ({err})"
        else:
            if data:
                return data
            problem = "holds no data"
    raise ImageError(f"the data URL {_shorten(url)} {problem}: "
                     "write it as data:image/png;base64,<the file in base64>")


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _open(name: str, data: bytes | Path) -> Image.Image:
    """The image opened (header read, no pixel decoded), or an ImageError saying why not."""
    try:
        return Image.open(_stream(data), formats=FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name} has too many pixels ({err}): scale it down first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is {_describe(data)}; lmforge reads PNG, JPEG and WebP: "
                         "convert it to one of those") from None
    except OSError as err:
        raise ImageError(f"cannot read {name}: {err}") from None


def _stream(data: bytes | Path) -> io.BytesIO | Path:
    return io.BytesIO(data) if isinstance(data, bytes) else data


def _describe(data: bytes | Path) -> str:
    """What a file that is not PNG, JPEG or WebP is, in words, for the error message."""
    try:
        with Image.open(_stream(data)) as image:
            return f"a {image.format} image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "not an image, or a damaged one"


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency laid on white (transformers' convert_to_rgb): black, what
    a plain convert gives transparent pixels, would change what the model sees."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _normalise(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, height, width) float32: the 8-bit RGB ``image`` scaled to [0, 1], minus ``mean``,
    over ``std``, per channel."""
    # Subtract then divide in float32, as transformers does, so the values are the same bits
    # (x / 255 in float32 equals its float64 x * (1/255) cast down, for every byte x).
    scaled = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    return ((scaled - _per_channel(mean)) / _per_channel(std)).contiguous()


def _per_channel(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def to_pixels(image: Image.Image, size: int, mean: Sequence[float] = SIGLIP_MEAN,
              std: Sequence[float] = SIGLIP_STD) -> torch.Tensor:
    """(3, size, size) float32: the RGB ``image`` resized to a square (bicubic, aspect ratio
    not kept) and normalised; lmforge's own VLMs see every image this way."""
    return _normalise(image.resize((size, size), Image.Resampling.BICUBIC), mean, std)


def model_pixels(image: Image.Image, vision: VisionConfig) -> torch.Tensor:
    """Pixels (3, size, size) of an image for an lmforge vision encoder of these settings."""
    return to_pixels(image, vision.image_size, (vision.image_mean,) * 3, (vision.image_std,) * 3)


class Prepared(NamedTuple):
    """An image ready for a model: the ``text`` that stands for it in the prompt, and the
    ``pixels`` (k, 3, size, size) that the text's image tokens read, tile by tile in order."""

    text: str
    pixels: torch.Tensor


class ImageProcessor(Protocol):
    """How one model sees images. A rendered prompt holds one ``image_token`` per image, which
    `expand_images` replaces by that image's prepared text."""

    image_token: str
    # True: the chat template reads message contents as lists of parts and writes the image
    # token itself for an image part (Hugging Face's multimodal templates); False: it reads
    # strings, with the image token already written where each image goes.
    template_parts: ClassVar[bool]

    def prepare(self, image: Image.Image) -> Prepared: ...


@dataclass(frozen=True)
class SquareView:
    """lmforge's own vision-language models: the image as one square (`model_pixels`), read
    by ``image_tokens`` copies of the image token."""

    vision: VisionConfig
    image_token: str
    image_tokens: int
    template_parts: ClassVar[bool] = False

    def prepare(self, image: Image.Image) -> Prepared:
        return Prepared(self.image_token * self.image_tokens, model_pixels(image, self.vision)[None])


def tiles_of(images: Sequence[Prepared]) -> tuple[torch.Tensor, ...]:
    """Every tile (3, size, size) of the prepared images, in prompt order: what a model (and
    an inference request) takes, one tile per run of image tokens."""
    return tuple(tile for image in images for tile in image.pixels)


def expand_images(text: str, image_token: str, replacements: Sequence[str]) -> str:
    """``text`` with its i-th ``image_token`` replaced by ``replacements[i]``; an ImageError
    when the counts differ (a prompt must hold one image token per image)."""
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(replacements):
        raise ImageError(f"the prompt has {len(pieces) - 1} {image_token} placeholders for "
                         f"{len(replacements)} images: put one {image_token} where each image "
                         "goes")
    expanded = [pieces[0]]
    for replacement, piece in zip(replacements, pieces[1:]):
        expanded += [replacement, piece]
    return "".join(expanded)


class Tiles(NamedTuple):
    """An image as Idefics3 sees it: ``pixels`` (n, 3, tile, tile), the rows x cols tiles in
    reading order then the global view; rows = cols = 0 when it is one tile only."""

    pixels: torch.Tensor
    rows: int
    cols: int


@dataclass(frozen=True)
class Idefics3Preprocess:
    """Idefics3 / SmolVLM image preprocessing and prompt expansion. The defaults are
    SmolVLM-256M's (``HuggingFaceTB/SmolVLM-256M-Instruct``)."""

    longest_edge: int = 2048  # the image's longest edge is resized to this first
    tile_size: int = 512  # the vision encoder's input: each tile, and the global view
    image_seq_len: int = 64  # <image> tokens per tile: (tile / patch)^2 / scale_factor^2
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD
    do_image_splitting: bool = True  # False: the global view alone
    resample: Image.Resampling = Image.Resampling.LANCZOS
    image_token: str = IMAGE_TOKEN  # the model's: its tokenizer's token at image_token_id
    template_parts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 1 <= self.longest_edge <= _MAX_LONGEST_EDGE:
            raise ConfigError(f"longest_edge={self.longest_edge}: it must be between 1 and "
                              f"{_MAX_LONGEST_EDGE} (the largest edge transformers resizes to)")
        for key in ("tile_size", "image_seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: it must be at least 1")
        for key in ("mean", "std"):
            if len(getattr(self, key)) != 3:
                raise ConfigError(f"{key}={getattr(self, key)}: give one value per channel (3)")

    @classmethod
    def from_hf(cls, *configs: Mapping[str, Any]) -> Idefics3Preprocess:
        """The settings of a Hugging Face Idefics3 or SmolVLM processor, from the contents of
        its ``preprocessor_config.json`` and ``processor_config.json`` (transformers 5 writes
        the first inside the second, under "image_processor"; pass what there is). A key left
        out takes transformers' default, as transformers would."""
        merged: dict[str, Any] = {}
        for config in configs:
            merged.update({k: v for k, v in config.items() if k != "image_processor"})
            merged.update(config.get("image_processor", {}))
        _check_hf_settings(merged)
        return cls(longest_edge=_edge(merged, "size", 4 * 364),
                   tile_size=_edge(merged, "max_image_size", 364),
                   image_seq_len=int(merged.get("image_seq_len", 169)),
                   mean=tuple(merged.get("image_mean", SIGLIP_MEAN)),
                   std=tuple(merged.get("image_std", SIGLIP_STD)),
                   do_image_splitting=bool(merged.get("do_image_splitting", True)),
                   resample=Image.Resampling(merged.get("resample", Image.Resampling.LANCZOS)))

    def to_hf(self) -> dict[str, Any]:
        """These settings as transformers writes an Idefics3 ``preprocessor_config.json``
        (``image_seq_len`` belongs to the processor, the image token to the tokenizer)."""
        return {"image_processor_type": "Idefics3ImageProcessor",
                "processor_class": "Idefics3Processor",
                **{key: True for key in _ALWAYS_ON}, "do_pad": True,
                "do_image_splitting": self.do_image_splitting,
                "size": {"longest_edge": self.longest_edge},
                "max_image_size": {"longest_edge": self.tile_size},
                "image_mean": list(self.mean), "image_std": list(self.std),
                "resample": int(self.resample), "rescale_factor": 1 / 255}

    def prepare(self, image: Image.Image) -> Prepared:
        tiles = self.pixels(image)
        return Prepared(self.prompt_for(tiles.rows, tiles.cols), tiles.pixels)

    def pixels(self, image: Image.Image) -> Tiles:
        """The tiles of the RGB ``image``, and how many rows and columns of them there are."""
        views, rows, cols = self._views(image)
        return Tiles(torch.stack([_normalise(v, self.mean, self.std) for v in views]), rows, cols)

    def _views(self, image: Image.Image) -> tuple[list[Image.Image], int, int]:
        tile = self.tile_size
        image = image.resize(_longest_edge_size(*image.size, self.longest_edge), self.resample)
        if not self.do_image_splitting:
            return [image.resize((tile, tile), self.resample)], 0, 0
        image = image.resize(_tile_multiple_size(*image.size, tile), self.resample)
        cols, rows = image.width // tile, image.height // tile
        if rows == cols == 1:
            return [image], 0, 0
        crops = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
                 for r in range(rows) for c in range(cols)]
        # The global view is the tiled image scaled down, not the original.
        return crops + [image.resize((tile, tile), self.resample)], rows, cols

    def prompt_for(self, rows: int, cols: int) -> str:
        """The text that stands for an image of rows x cols tiles (0 x 0: one tile)."""
        tokens = self.image_token * self.image_seq_len
        global_view = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tokens}{FAKE_IMAGE_TOKEN}"
        if rows == cols == 0:
            return global_view
        lines = ["".join(f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{tokens}"
                         for c in range(cols)) + "\n" for r in range(rows)]
        return "".join(lines) + "\n" + global_view

    def expand(self, text: str, grids: Sequence[tuple[int, int]]) -> str:
        """``text`` with its i-th image token replaced by the text of an image of
        ``grids[i]`` = (rows, cols) tiles."""
        return expand_images(text, self.image_token,
                             [self.prompt_for(rows, cols) for rows, cols in grids])


def image_processor(cfg: Any, tokenizer: Tokenizer,
                    hf_settings: Mapping[str, Any] | None = None) -> ImageProcessor | None:
    """How the model of ``cfg`` sees images: Idefics3's tiles, with the Hugging Face processor
    settings its model directory keeps (``hf_settings``: preprocessor_config.json), or else
    lmforge's one square view; None for a model that reads no images. The image token is the
    tokenizer's token at image_token_id."""
    if not isinstance(cfg, VLMConfig):
        return None
    token = tokenizer.backend.id_to_token(cfg.image_token_id)
    if token is None:
        raise ConfigError(f"the model's image_token_id {cfg.image_token_id} is not in its "
                          f"tokenizer's vocabulary of {tokenizer.vocab_size}: the model "
                          "directory's config.json and tokenizer.json do not belong together")
    if hf_settings is None:
        return SquareView(cfg.vision, token, cfg.image_tokens)
    tiles = Idefics3Preprocess.from_hf(hf_settings)
    if tiles.tile_size != cfg.vision.image_size:
        raise UnsupportedModel(f"the processor config cuts images into tiles of "
                               f"max_image_size={tiles.tile_size} px, and the vision encoder "
                               f"reads {cfg.vision.image_size} px (image_size): they must agree")
    # The count comes from the model, so a processor setting cannot contradict it.
    return replace(tiles, image_seq_len=cfg.image_tokens, image_token=token)


# What transformers' Idefics3 image processor can be told to skip; lmforge always does all.
_ALWAYS_ON = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")


def _check_hf_settings(config: Mapping[str, Any]) -> None:
    for key in _ALWAYS_ON:
        if not config.get(key, True):
            raise UnsupportedModel(f"the processor config sets {key}=false; lmforge's Idefics3 "
                                   "preprocessing always converts to RGB, resizes, rescales "
                                   "and normalises")
    if config.get("resample", Image.Resampling.LANCZOS) not in set(Image.Resampling):
        raise UnsupportedModel(f"the processor config sets resample={config['resample']}, "
                               "which is none of Pillow's resampling filters (1 is LANCZOS)")
    factor = config.get("rescale_factor", 1 / 255)
    if not math.isclose(factor, 1 / 255):
        raise UnsupportedModel(f"the processor config sets rescale_factor={factor}; lmforge's "
                               "Idefics3 preprocessing scales pixels by 1/255")


def _edge(config: Mapping[str, Any], key: str, default: int) -> int:
    size = config.get(key, {"longest_edge": default})
    if "longest_edge" not in size:
        raise UnsupportedModel(f"the processor config's {key} is {size}; lmforge's Idefics3 "
                               'preprocessing needs {"longest_edge": N}')
    return int(size["longest_edge"])


def _longest_edge_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) with the longest edge at ``longest``, the other in proportion, rounded
    down then up to even (transformers' rule, quirks included: a square of odd ``longest``
    gets one row more than columns)."""
    if width >= height:
        width, height = longest, int(longest / (width / height))
        height += height % 2
    else:
        height, width = longest, int(longest * (width / height))
        width += width % 2
    return max(width, 1), max(height, 1)


def _tile_multiple_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) rounded up to whole tiles: the longest edge first, then the other from
    the rounded longest edge, as transformers computes it."""
    ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * ratio) / tile) * tile
    return width, height
