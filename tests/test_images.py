"""Images: reading them (and refusing what cannot be read), and preprocessing in parity with
transformers' SigLIP and Idefics3 (SmolVLM) processors, built locally from explicit settings."""

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import tokenizers
import torch
from PIL import Image

from lmforge.errors import ConfigError, LmforgeError, UnsupportedModel
from lmforge.images import (
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    IMAGE_TOKEN,
    MAX_PIXELS,
    Idefics3Preprocess,
    ImageError,
    load_image,
    to_pixels,
)
from lmforge.tokenizer import Tokenizer

# (width, height): square, landscape, portrait, larger than every test tile grid, extreme
# strips both ways, odd sizes smaller than one tile, and a shape whose short edge gains a row
# of tiles when transformers derives it from the long edge rounded up to whole tiles.
SIZES = [(64, 64), (300, 200), (200, 300), (1000, 600), (17, 900), (900, 17), (33, 31),
         (400, 310)]
# Small Idefics3 settings, as preprocessor_config.json writes them; the real SmolVLM ones
# (2048 / 512) have a test of their own.
SETTINGS = {
    "tiles": {"size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32},
              "resample": 1},
    # 80 is not a whole number of tiles: the image is stretched up to 96 x ...
    "partial-tiles": {"size": {"longest_edge": 80}, "max_image_size": {"longest_edge": 32},
                      "resample": 3, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711]},
    "no-splitting": {"size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32},
                     "do_image_splitting": False},
}
SMOLVLM_PREPROCESSOR = {  # HuggingFaceTB/SmolVLM-256M-Instruct's preprocessor_config.json
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Idefics3ImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 512}, "processor_class": "Idefics3Processor",
    "resample": 1, "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 2048},
}
SMOLVLM_PROCESSOR = {"image_seq_len": 64, "processor_class": "Idefics3Processor"}
IMAGE_SEQ_LEN = 4


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients under noise: smooth areas and sharp detail, so that every resampling step
    shows in the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     (x * 7 + y * 3) % 256], axis=-1)
    noisy = base + np.random.default_rng(seed).normal(0, 24, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` whose pixel data stops after a few bytes: what a
    decompression bomb looks like before it is decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(bytes(64))))


# --- reading ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"lossless": True})])
def test_a_lossless_image_reads_back_the_same_from_a_path_bytes_or_a_data_url(tmp_path, fmt,
                                                                              options):
    original = picture(40, 30)
    data = encoded(original, fmt, **options)
    path = tmp_path / f"picture.{fmt.lower()}"
    path.write_bytes(data)
    for source in (path, str(path), data, data_url(data, f"image/{fmt.lower()}")):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (40, 30)
        assert np.array_equal(np.array(image), np.array(original)), source


def test_jpeg_reads_and_its_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = load_image(encoded(picture(40, 30), "JPEG", exif=exif))
    assert image.mode == "RGB" and image.size == (30, 40)
    assert load_image(encoded(picture(40, 30), "JPEG")).size == (40, 30)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode):
    pixels = np.zeros((4, 6, 4), dtype=np.uint8)
    pixels[..., 0] = 200  # a red that must not show where alpha is 0
    pixels[:, :3, 3] = 255  # left half opaque, right half transparent
    image = Image.fromarray(pixels, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = Image.new("P", (6, 4))
        image.putpalette([200, 0, 0, 0, 0, 0])  # red, and black marked transparent below
        image.putdata([0 if x < 3 else 1 for _ in range(4) for x in range(6)])
        image.info["transparency"] = 1
    rgb = np.array(load_image(encoded(image, "PNG", **image.info)))
    assert (rgb[:, 3:] == 255).all()
    assert (rgb[:, :3] != 255).any()


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ImageError, match=r"nowhere\.png: no such file"):
        load_image(tmp_path / "nowhere.png")
    with pytest.raises(ImageError, match="a directory, not an image file"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(tmp_path, fmt):
    path = tmp_path / "picture.img"
    path.write_bytes(encoded(picture(8, 8), fmt))
    with pytest.raises(ImageError, match=f"picture.img is a {fmt} image; lmforge reads PNG, "
                                         "JPEG and WebP"):
        load_image(path)


@pytest.mark.parametrize("data, expected", [
    (b"these bytes are not an image", "the image data is not an image, or a damaged one"),
    (encoded(picture(64, 64), "PNG")[:3000], "the image data is a damaged PNG image"),
    (encoded(picture(64, 64), "JPEG")[:800], "the image data is a damaged JPEG image"),
    (encoded(picture(64, 64), "WEBP")[:200], "cannot read the image data"),
])
def test_damaged_data_is_refused(data, expected):
    with pytest.raises(ImageError, match=expected):
        load_image(data)


def test_too_many_pixels_are_refused_from_the_header_before_decoding():
    # The header claims 8000 x 8000 (64 MP) and no pixel data follows: decoding would fail
    # as damaged, so the size error shows the header was checked first.
    with pytest.raises(ImageError, match=r"8000x8000 = 64,000,000 pixels, more than the "
                                         r"50,000,000 allowed \(max_pixels\)"):
        load_image(png_header(8000, 8000))
    with pytest.raises(ImageError, match="the image data is a damaged PNG image"):
        load_image(png_header(80, 80))
    with pytest.raises(ImageError, match="40x30 = 1,200 pixels, more than the 1,000 allowed"):
        load_image(encoded(picture(40, 30), "PNG"), max_pixels=1000)
    assert 8000 * 8000 > MAX_PIXELS


def test_a_decompression_bomb_is_refused():
    # Past twice Pillow's own limit Pillow refuses it while reading the header.
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(png_header(100_000, 100_000), max_pixels=10**11)


@pytest.mark.parametrize("url, expected", [
    ("data:image/png;base64", "has no ',' before its data"),
    ("data:text/plain;base64,aGVsbG8=", "holds text/plain, not an image"),
    ("data:,hello", "holds text/plain, not an image"),
    ("data:image/png,%89PNG", "is not base64-encoded"),
    ("data:image/png;base64,not*base64!", "has invalid base64 data"),
    ("data:image/png;base64,", "holds no data"),
])
def test_malformed_data_urls_are_refused(url, expected):
    with pytest.raises(ImageError, match=expected) as caught:
        load_image(url)
    assert "data:image/png;base64,<the file in base64>" in str(caught.value)


def test_other_sources_are_refused():
    with pytest.raises(ImageError, match="lmforge does not download images"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ImageError, match="file path, bytes or a data:image/...;base64, URL, "
                                         "not a int"):
        load_image(42)
    assert issubclass(ImageError, LmforgeError) and issubclass(ImageError, ValueError)


# --- lmforge's own preprocessing (SigLIP) -------------------------------------------------

@pytest.mark.parametrize("width, height", SIZES)
def test_to_pixels_matches_transformers_siglip(width, height):
    from transformers import SiglipImageProcessorPil

    image = picture(width, height)
    theirs = SiglipImageProcessorPil(size={"height": 48, "width": 48})(image)["pixel_values"][0]
    ours = to_pixels(image, 48)
    assert ours.shape == (3, 48, 48) and ours.dtype == torch.float32
    # Not just close: the same Pillow resize and the same float roundings give the same bits.
    assert torch.equal(ours, torch.from_numpy(theirs))


# --- Idefics3 / SmolVLM ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_tokenizers(smolvlm_tokenizer_json, tmp_path_factory):
    """lmforge's BPE with SmolVLM's image tokens added, and the same file in transformers."""
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_str(smolvlm_tokenizer_json)
    ours = Tokenizer(backend)
    path = ours.save(tmp_path_factory.mktemp("image-tokenizer"))
    return ours, PreTrainedTokenizerFast(tokenizer_file=str(path))


def hf_processor(hf_tokenizer, config: dict, image_seq_len: int):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    return Idefics3Processor(Idefics3ImageProcessorPil(**config), hf_tokenizer,
                             image_seq_len=image_seq_len)


def assert_parity(ours: Idefics3Preprocess, theirs, tokenizer: Tokenizer,
                  images: list[Image.Image], text: str) -> None:
    """Tiles, rows and columns, expanded prompt text and token ids: all as transformers'."""
    out = theirs(text=[text], images=[images], return_text_replacement_offsets=True)
    grids = theirs.image_processor(images=[images], return_row_col_info=True)
    tiles = [ours.pixels(image) for image in images]
    assert [(t.rows, t.cols) for t in tiles] == list(zip(grids["rows"][0], grids["cols"][0]))
    assert torch.equal(torch.cat([t.pixels for t in tiles]),
                       torch.from_numpy(out["pixel_values"][0]))
    replacements = [r["replacement"] for r in out["text_replacement_offsets"][0]]
    assert [ours.prompt_for(t.rows, t.cols) for t in tiles] == replacements
    expanded = ours.expand(text, [(t.rows, t.cols) for t in tiles])
    assert tokenizer.encode(expanded) == out["input_ids"][0]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("width, height", SIZES)
def test_idefics3_matches_transformers(image_tokenizers, setting, width, height):
    config = SETTINGS[setting]
    ours = Idefics3Preprocess.from_hf(config, {"image_seq_len": IMAGE_SEQ_LEN})
    theirs = hf_processor(image_tokenizers[1], config, IMAGE_SEQ_LEN)
    assert_parity(ours, theirs, image_tokenizers[0], [picture(width, height)],
                  f"User:{IMAGE_TOKEN}What is in this picture?<end_of_utterance>\nAssistant:")


def test_idefics3_matches_transformers_for_several_images_in_one_prompt(image_tokenizers):
    ours = Idefics3Preprocess.from_hf(SETTINGS["tiles"], {"image_seq_len": IMAGE_SEQ_LEN})
    theirs = hf_processor(image_tokenizers[1], SETTINGS["tiles"], IMAGE_SEQ_LEN)
    images = [picture(300, 200, seed=1), picture(20, 20, seed=2), picture(17, 900, seed=3)]
    assert_parity(ours, theirs, image_tokenizers[0], images,
                  f"{IMAGE_TOKEN}First, {IMAGE_TOKEN} then\n{IMAGE_TOKEN}: compare them.")


def test_idefics3_matches_transformers_with_smolvlm_settings(image_tokenizers):
    ours = Idefics3Preprocess.from_hf(SMOLVLM_PREPROCESSOR, SMOLVLM_PROCESSOR)
    assert ours == Idefics3Preprocess()  # its defaults are SmolVLM-256M's
    theirs = hf_processor(image_tokenizers[1], SMOLVLM_PREPROCESSOR, 64)
    assert_parity(ours, theirs, image_tokenizers[0], [picture(300, 200)],
                  f"User:{IMAGE_TOKEN}Describe it.")
    tiles = ours.pixels(picture(300, 200))
    assert (tiles.rows, tiles.cols) == (3, 4) and tiles.pixels.shape == (13, 3, 512, 512)


def test_prompt_text_of_one_tile_and_of_a_grid():
    pre = Idefics3Preprocess(image_seq_len=2)
    image = "<image><image>"
    assert pre.prompt_for(0, 0) == (f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image}"
                                    f"{FAKE_IMAGE_TOKEN}")
    assert pre.prompt_for(2, 1) == (f"{FAKE_IMAGE_TOKEN}<row_1_col_1>{image}\n"
                                    f"{FAKE_IMAGE_TOKEN}<row_2_col_1>{image}\n"
                                    f"\n{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{image}"
                                    f"{FAKE_IMAGE_TOKEN}")


def test_as_many_placeholders_as_images_are_needed():
    pre = Idefics3Preprocess()
    with pytest.raises(ImageError, match="the prompt has 1 <image> placeholders for 2 images"):
        pre.expand(f"Compare {IMAGE_TOKEN}", [(0, 0), (1, 2)])
    assert pre.expand("no image", []) == "no image"


def test_settings_saved_by_transformers_read_back(image_tokenizers, tmp_path):
    """transformers 5 writes the image processor's settings inside processor_config.json."""
    config = {**SETTINGS["partial-tiles"], "do_image_splitting": False}
    hf_processor(image_tokenizers[1], config, 9).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert Idefics3Preprocess.from_hf(saved) == Idefics3Preprocess(
        longest_edge=80, tile_size=32, image_seq_len=9, mean=tuple(config["image_mean"]),
        std=tuple(config["image_std"]), do_image_splitting=False,
        resample=Image.Resampling.BICUBIC)


def test_settings_lmforge_cannot_reproduce_are_refused():
    with pytest.raises(UnsupportedModel, match="sets do_normalize=false"):
        Idefics3Preprocess.from_hf({**SMOLVLM_PREPROCESSOR, "do_normalize": False})
    with pytest.raises(UnsupportedModel, match="sets resample=99, which is none of Pillow's"):
        Idefics3Preprocess.from_hf({**SMOLVLM_PREPROCESSOR, "resample": 99})
    with pytest.raises(UnsupportedModel, match="sets rescale_factor=1.0"):
        Idefics3Preprocess.from_hf({**SMOLVLM_PREPROCESSOR, "rescale_factor": 1.0})
    with pytest.raises(UnsupportedModel, match=r"max_image_size is \{'height': 512"):
        Idefics3Preprocess.from_hf({**SMOLVLM_PREPROCESSOR,
                                    "max_image_size": {"height": 512, "width": 512}})
    with pytest.raises(ConfigError, match="longest_edge=5000: it must be between 1 and 4096"):
        Idefics3Preprocess(longest_edge=5000)
    with pytest.raises(ConfigError, match="mean=.*one value per channel"):
        Idefics3Preprocess(mean=(0.5,))
