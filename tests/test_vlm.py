"""The vision-language model: pixel shuffle, image-token splicing, cached decoding with
images, the model directory."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import resolve_vlm_config
from lmforge.errors import ConfigError
from lmforge.modeldir import read_model, save_model
from lmforge.models import build_model
from lmforge.models.vlm import VLM, ImageTokenMismatch, pixel_shuffle

IMAGE = 3  # the image token's id in these tests


def tiny(**overrides) -> VLM:
    torch.manual_seed(0)
    cfg = resolve_vlm_config({"preset": "vlm-tiny", "text": {"vocab_size": 50},
                              "image_token_id": IMAGE, **overrides})
    return build_model(cfg).eval()


def test_pixel_shuffle_groups_r_by_r_patches_as_idefics3_does():
    n, side, d, r = 2, 4, 3, 2
    x = torch.randn(n, side * side, d)
    grid = x.view(n, side, side, d)
    expected = torch.empty(n, (side // r) ** 2, d * r * r)
    for gh in range(side // r):
        for gw in range(side // r):
            for dh in range(r):
                for dw in range(r):
                    at = (dh * r + dw) * d
                    expected[:, gh * (side // r) + gw, at:at + d] = grid[:, gh * r + dh,
                                                                        gw * r + dw]
    torch.testing.assert_close(pixel_shuffle(x, r), expected, rtol=0, atol=0)


@torch.no_grad()
def test_images_replace_their_tokens_in_order():
    model = tiny()
    tokens = torch.tensor([[5, *[IMAGE] * 4, 6, *[IMAGE] * 4, 7]])
    images = torch.randn(2, 3, 32, 32)
    features = model.image_features(images).flatten(0, 1)  # (8, width): first image, then the second
    embeds = model.embed(tokens, model.image_features(images))
    assert torch.equal(embeds[0, 1:5], features[:4]) and torch.equal(embeds[0, 6:10], features[4:])
    text = model.text.embed(tokens)
    for i in (0, 5, 10):
        assert torch.equal(embeds[0, i], text[0, i])
    with pytest.raises(ImageTokenMismatch, match="8 image tokens and 1 image"):
        model.embed(tokens, model.image_features(images[:1]))


@torch.no_grad()
def test_image_columns_read_each_patchs_share_of_its_image_token():
    """A column's features are the largest, over its rows, of each patch's share of its image
    token: the projector's weight columns that read that patch (pixel_shuffle's order)."""
    model = tiny()
    images = torch.randn(2, 3, 32, 32)
    patches = model.vision(images)  # (2, 16, d): a 4 x 4 grid of patches
    n, side, d, r = 2, 4, patches.shape[-1], model.cfg.scale_factor
    weight = model.projector.proj.weight
    shares = torch.empty(n, side, side, weight.shape[0])
    for i in range(side):
        for j in range(side):
            at = ((i % r) * r + j % r) * d
            shares[:, i, j] = patches[:, i * side + j] @ weight[:, at:at + d].T
    # each image token is the sum of its r x r patches' shares
    tokens = shares.view(n, side // r, r, side // r, r, -1).sum((2, 4)).flatten(1, 2)
    torch.testing.assert_close(tokens, model.projector(patches))
    expected = model.text.lm_head(model.text.final_norm(shares.amax(1)))
    torch.testing.assert_close(model.image_columns(patches), expected)
    assert expected.shape == (n, side, model.cfg.vocab_size)
    with pytest.raises(ConfigError, match="linear projector"):
        tiny(projector="mlp").image_columns(patches)


@torch.no_grad()
def test_image_words_read_the_output_head_from_the_images_own_features():
    model = tiny()
    tokens = torch.tensor([[5, *[IMAGE] * 4, 6, *[IMAGE] * 4, 7]])
    images = torch.randn(2, 3, 32, 32)
    logits, words = model(tokens, images=images, image_words="pooled")
    torch.testing.assert_close(logits, model(tokens, images=images), rtol=0, atol=0)
    features = model.image_features(images)  # (2, 4, width)
    expected = model.text.lm_head(model.text.final_norm(features.amax(1)))
    torch.testing.assert_close(words, expected)
    assert words.shape == (2, model.cfg.vocab_size)
    with pytest.raises(ValueError, match="image_words needs images"):
        model(tokens, image_words="pooled")


@torch.no_grad()
def test_cached_decoding_with_an_image_equals_the_full_pass():
    model = tiny(projector="mlp")
    tokens = torch.tensor([[5, 6, *[IMAGE] * 4, 7, 8, 9, 10]])
    image = torch.randn(1, 3, 32, 32)
    full = model(tokens, images=image)
    cache = model.new_cache(1, 16)
    steps = [model(tokens[:, :7], cache=cache, start=0, images=image)]
    steps += [model(tokens[:, t:t + 1], cache=cache, start=t) for t in range(7, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # The image matters: another one changes the text that follows it.
    other = model(tokens, images=torch.randn(1, 3, 32, 32))
    assert (other[0, 6:] - full[0, 6:]).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_a_vlm_model_directory_reads_back_the_same_model(tmp_path, stem):
    model = tiny(vision={"stem": stem})
    save_model(tmp_path, model, None)
    again = read_model(tmp_path)
    assert isinstance(again, VLM) and again.cfg == model.cfg
    tokens = torch.tensor([[5, *[IMAGE] * 4, 6]])
    image = torch.randn(1, 3, 32, 32)
    assert torch.equal(again(tokens, images=image), model(tokens, images=image))
    # The tied output projection is stored once.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "text.lm_head.weight" not in f.keys()


def test_a_convolutional_stem_keeps_the_patch_grid():
    model = tiny(vision={"stem": "conv"})
    # 32 px, patch 8: three halvings to a 4 x 4 grid, one feature per patch as before
    assert model.vision(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
    with pytest.raises(ConfigError, match="patch_size must be a power of 2, not 12"):
        resolve_vlm_config({"preset": "vlm-tiny", "vision": {"stem": "conv", "image_size": 48,
                                                             "patch_size": 12}})
    with pytest.raises(ConfigError, match="stem"):
        resolve_vlm_config({"preset": "vlm-tiny", "vision": {"stem": "resnet"}})


def test_per_image_norm_reads_a_shifted_or_fainter_image_as_the_same():
    normed, plain = tiny(vision={"per_image_norm": True}), tiny()
    pixels = torch.rand(2, 3, 32, 32)
    # another background tint (a constant per channel) at 80% of the contrast
    other = 0.8 * pixels + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed.vision(other), normed.vision(pixels),
                                   atol=1e-2, rtol=0)
        assert not torch.allclose(plain.vision(other), plain.vision(pixels), atol=0.1)


def test_presets_have_their_image_token_counts():
    assert resolve_vlm_config("vlm-small").image_tokens == 16
    smol = resolve_vlm_config("smolvlm-256m")
    assert smol.image_tokens == 64 and smol.vision.patches == 1024
    with torch.device("meta"):
        report = build_model(smol).flops()
    # SigLIP-B/16 (~86 M) + SmolLM2-135M (~135 M) + the projector: SmolVLM-256M's size.
    assert 250e6 < report.params < 260e6


@torch.no_grad()
def test_the_engine_decodes_image_and_text_requests_together_as_alone():
    from lmforge.infer.engine import Engine, Request
    from lmforge.infer.sampling import SamplingConfig

    model = tiny()
    greedy = SamplingConfig(temperature=0)
    image = torch.randn(3, 32, 32)
    with_image = Request([5, 6, *[IMAGE] * 4, 7], 8, greedy, images=(image,))
    text_only = Request([9, 10, 11], 8, greedy)
    together = Engine(model, max_batch=2).run([with_image, text_only])
    alone = [Engine(model, max_batch=1).run([r])[0] for r in (with_image, text_only)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    # The engine's tokens are the full pass's argmax, step by step (no cache).
    tokens = list(with_image.prompt)
    for _ in range(8):
        logits = model(torch.tensor([tokens]), images=image[None])
        tokens.append(int(logits[0, -1].argmax()))
    assert together[0].tokens == tokens[len(with_image.prompt):]
    # Drafting from a prompt of image tokens: never a draft of the image token, same tokens.
    repeats = Request([*[IMAGE] * 4, 7, 8, 7, 8, 7], 12, greedy, images=(image,))
    after_image = Request([5, *[IMAGE] * 4, 5], 12, greedy, images=(image,))  # "5" drafts images
    requests = [repeats, after_image, text_only]
    drafting = Engine(model, max_batch=3, draft=4)
    assert ([c.tokens for c in drafting.run(requests)]
            == [c.tokens for c in Engine(model, max_batch=3).run(requests)])
    assert drafting.speculation.drafted > 0


def test_the_engine_refuses_images_it_cannot_place():
    from lmforge.config import ModelConfig
    from lmforge.infer.engine import Engine, Request
    from lmforge.models.decoder import Decoder

    engine = Engine(tiny(), max_batch=1)
    image = torch.randn(3, 32, 32)
    with pytest.raises(ValueError, match="4 image tokens for 2 image"):
        engine.submit(Request([5, *[IMAGE] * 4], 3, images=(image, image)))
    with pytest.raises(ValueError, match=r"shape \(3, 64, 64\); this model reads \(3, 32, 32\)"):
        engine.submit(Request([5, *[IMAGE] * 4], 3, images=(torch.randn(3, 64, 64),)))
    text = Engine(Decoder(ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=50)))
    with pytest.raises(ValueError, match="reads text only"):
        text.submit(Request([5, 6], 3, images=(image,)))


@torch.no_grad()
def test_the_engine_never_generates_the_image_token():
    """The image token only comes with an image, in a prompt: even a model that rates it
    highest after text never gets it sampled (nor does a decoder grown by it change)."""
    from lmforge.infer.engine import Engine, Request
    from lmforge.infer.sampling import SamplingConfig

    model = tiny()
    prompt = [5, 6, 7]
    best = int(model(torch.tensor([prompt]))[0, -1].argmax())
    # The (tied) output row of the image token made ten times the best token's.
    model.text.embed.weight[IMAGE] = 10 * model.text.embed.weight[best]
    assert int(model(torch.tensor([prompt]))[0, -1].argmax()) == IMAGE
    engine = Engine(model, max_batch=2)
    done = engine.run([Request(prompt, 8, SamplingConfig(temperature=0)),
                       Request(prompt, 8, SamplingConfig(temperature=1.0), seed=0,
                               logprobs=3)])
    assert all(IMAGE not in c.tokens for c in done)
    assert done[0].tokens[0] == best
    assert all(IMAGE not in [t for t, _ in lp.top] for lp in done[1].logprobs)


def test_info_gives_each_part_its_parameters_and_flops(capsys):
    from lmforge.cli import main

    assert main(["info", "vlm-tiny"]) == 0
    out = capsys.readouterr().out
    # vlm-tiny: 32 px images in 8 px patches (16), 2 blocks 32 wide; r = 2: 4 image tokens.
    # Vision: 6 per weight per patch but the 16 x 32 learned positions, plus attention
    # 12 x layers x width x patches, for each of the 16 patches.
    vision_params = 32_160
    vision_flops = 16 * (6 * (vision_params - 16 * 32) + 12 * 2 * 32 * 16)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-3:]}
    assert rows == {"vision": [f"{vision_params:,}", f"{vision_flops:,}", "per", "image"],
                    "projector": ["4,096", f"{6 * 4096 * 4:,}", "per", "image"],
                    "text": ["35,008", "308,352", "per", "token"]}
