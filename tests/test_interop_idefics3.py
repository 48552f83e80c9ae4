"""Idefics3 (SmolVLM) interop: a tiny random `Idefics3ForConditionalGeneration` and its
`Idefics3Processor`, built with transformers' own classes and saved, then imported.

The processor is scaled down so that images are cut into tiles (32 px tiles of images resized
to a longest edge of 96 px: up to 3 x 3 tiles plus the global view), and every check compares
with transformers on the same images and messages: the prompt's token ids, the pixel tiles,
the logits, greedy generation; then our export loads back into transformers.
"""

import json
import shutil

import numpy as np
import pytest
import tokenizers
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from lmforge.chat import ChatSession, prompt_with_images, vision_chat_prompt_ids  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.compress.quant import QuantSpec  # noqa: E402
from lmforge.compress.run import quantize_dir  # noqa: E402
from lmforge.errors import UnsupportedModel  # noqa: E402
from lmforge.finetune.run import merge  # noqa: E402
from lmforge.images import (  # noqa: E402
    IMAGE_TOKEN,
    Idefics3Preprocess,
    load_image,
    tiles_of,
)
from lmforge.infer.engine import Engine, Request  # noqa: E402
from lmforge.infer.sampling import SamplingConfig  # noqa: E402
from lmforge.interop.hf import config_from_hf, export_hf, import_hf  # noqa: E402
from lmforge.lora import LoraConfig, apply_lora, save_adapter  # noqa: E402
from lmforge.modeldir import read_model  # noqa: E402
from lmforge.models.vlm import VLM  # noqa: E402
from lmforge.open import open_model  # noqa: E402

# SmolVLM-256M-Instruct's chat template: it reads contents only as lists of parts.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
PROCESSOR = {"size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32},
             "resample": 1}
SIZES = [(300, 200), (17, 90), (64, 64)]  # 3 x 2, 1 x 3 and 3 x 3 tiles, plus a global view
GREEDY = SamplingConfig(temperature=0)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def vision_config(**overrides) -> dict:
    return {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=32, patch_size=8), **overrides}


def hf_config(vocab_size: int, image_token_id: int, tied: bool = False, **vision):
    return transformers.Idefics3Config(
        vision_config=vision_config(**vision),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=vocab_size, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied),
        scale_factor=2, image_token_id=image_token_id, tie_word_embeddings=tied)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter, so that a misplaced norm weight or bias cannot hide."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(smolvlm_tokenizer_json, tmp_path_factory):
    """A saved HF directory: model, tokenizer (with SmolVLM's image tokens), processor."""
    backend = tokenizers.Tokenizer.from_str(smolvlm_tokenizer_json)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<end_of_utterance>")
    processor = transformers.Idefics3Processor(
        transformers.Idefics3ImageProcessorPil(**PROCESSOR), tokenizer, image_seq_len=4,
        chat_template=SMOLVLM_TEMPLATE)
    torch.manual_seed(0)
    config = hf_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    model = _perturb(transformers.Idefics3ForConditionalGeneration(config))
    path = tmp_path_factory.mktemp("hf-idefics3")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(hf_dir):
    model = transformers.Idefics3ForConditionalGeneration.from_pretrained(hf_dir).eval()
    return model, transformers.AutoProcessor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def ours(hf_dir, tmp_path_factory):
    out = import_hf(hf_dir, tmp_path_factory.mktemp("imported") / "model")
    return open_model(out, "cpu", "fp32")


def asking(n_images: int, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)),
                                         {"type": "text", "text": text}]}]


def transformers_inputs(processor, messages: list[dict], images: list[Image.Image]):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=text, images=[images] if images else None, return_tensors="pt")


def our_inputs(opened, messages: list[dict], images: list[Image.Image]):
    prepared = [opened.processor.prepare(image) for image in images]
    return (vision_chat_prompt_ids(opened.tokenizer, opened.processor, messages, prepared),
            tiles_of(prepared))


@torch.no_grad()
@pytest.mark.parametrize("images", [[picture(*size, seed=i)] for i, size in enumerate(SIZES)]
                         + [[picture(300, 200, seed=5), picture(17, 90, seed=6)]],
                         ids=["3x2", "1x3", "3x3", "two-images"])
def test_imported_model_reads_images_and_prompts_as_transformers(hf, ours, images):
    model, processor = hf
    messages = asking(len(images))
    theirs = transformers_inputs(processor, messages, images)
    prompt, tiles = our_inputs(ours, messages, images)
    assert prompt == theirs["input_ids"][0].tolist()
    assert torch.equal(torch.stack(tiles), theirs["pixel_values"][0])
    expected = model(**theirs).logits
    logits = ours.model(torch.tensor([prompt]), images=torch.stack(tiles))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # The pixels matter: other images change what follows them.
    other = ours.model(torch.tensor([prompt]), images=torch.randn(len(tiles), 3, 32, 32))
    assert (other - logits).abs().max() > 1e-2


def test_the_imported_directory_keeps_the_image_processor(ours):
    cfg = ours.model.cfg
    assert isinstance(ours.model, VLM) and cfg.scale_factor == 2 and cfg.image_tokens == 4
    assert ours.processor == Idefics3Preprocess(longest_edge=96, tile_size=32, image_seq_len=4)
    assert ours.tokenizer.token_id(IMAGE_TOKEN) == cfg.image_token_id
    saved = json.loads((ours.directory / "preprocessor_config.json").read_text())
    assert Idefics3Preprocess.from_hf(saved, {"image_seq_len": 4}) == ours.processor


@pytest.mark.parametrize("rewrite", ["quantize", "merge"])
def test_quantize_and_merge_keep_the_image_processor(ours, rewrite, tmp_path):
    source = ours.directory
    if rewrite == "merge":  # a LoRA adapter beside the weights, folded in by merge
        model = read_model(source)
        apply_lora(model, LoraConfig(2, 4.0, 0.0, "all-linear"))
        shutil.copytree(source, tmp_path / "run")
        save_adapter(tmp_path / "run", model, LoraConfig(2, 4.0, 0.0, "all-linear"), base=".")
        out = merge(tmp_path / "run", tmp_path / "out")
    else:
        out = quantize_dir(source, tmp_path / "out", QuantSpec(bits=8))
    assert open_model(out, "cpu", "fp32").processor == ours.processor


@torch.no_grad()
def test_cached_decoding_with_tiles_equals_the_full_pass(ours):
    prompt, tiles = our_inputs(ours, asking(1), [picture(300, 200)])
    tokens = torch.tensor([prompt + [5, 6, 7]])
    pixels = torch.stack(tiles)
    full = ours.model(tokens, images=pixels)
    cache = ours.model.new_cache(1, len(prompt) + 3)
    steps = [ours.model(tokens[:, :len(prompt)], cache=cache, start=0, images=pixels)]
    steps += [ours.model(tokens[:, t:t + 1], cache=cache, start=t)
              for t in range(len(prompt), len(prompt) + 3)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generation_and_chat_give_transformers_greedy_tokens(hf, ours, tmp_path):
    model, processor = hf
    image = picture(17, 90, seed=3)
    theirs = transformers_inputs(processor, asking(1, "Describe it."), [image])
    generated = model.generate(**theirs, max_new_tokens=6, do_sample=False)
    expected = generated[0, theirs["input_ids"].shape[1]:].tolist()
    path = tmp_path / "picture.png"
    image.save(path)
    prompt, tiles = prompt_with_images(ours.processor, ours.tokenizer, "Describe it.", [path],
                                       chat=True)
    done = Engine(ours.model, ours.tokenizer, max_batch=1).run(
        [Request(prompt, 6, GREEDY, images=tiles)])[0]
    assert done.tokens == expected
    session = ChatSession(ours.model, ours.tokenizer, (), GREEDY, max_new_tokens=6,
                          processor=ours.processor)
    session.attach(path)
    assert "".join(session.reply("Describe it.")) == ours.tokenizer.decode(expected)


def test_generate_command_reads_an_imported_directory(hf_dir, tmp_path, capsys):
    path = tmp_path / "picture.png"
    picture(40, 30).save(path)
    assert main(["generate", str(hf_dir), "--image", str(path), "--prompt", "What is it?",
                 "--chat", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


@torch.no_grad()
def test_export_loads_in_transformers_with_the_same_processor_and_logits(hf, ours, tmp_path):
    model, processor = hf
    out = export_hf(ours.directory, tmp_path / "hf")
    again = transformers.Idefics3ForConditionalGeneration.from_pretrained(out).eval()
    again_processor = transformers.AutoProcessor.from_pretrained(out)
    images = [picture(300, 200, seed=1), picture(64, 64, seed=2)]
    theirs = transformers_inputs(processor, asking(2), images)
    exported = transformers_inputs(again_processor, asking(2), images)
    assert torch.equal(exported["input_ids"], theirs["input_ids"])
    assert torch.equal(exported["pixel_values"], theirs["pixel_values"])
    torch.testing.assert_close(again(**exported).logits, model(**theirs).logits,
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_lmforge_vlm_exports_as_idefics3(tmp_path, bpe_tokenizer):
    """One of lmforge's own VLMs (tied embeddings, its own image token): transformers loads
    the model and computes the same logits from the same ids and pixels."""
    from dataclasses import replace

    from lmforge.config import resolve_vlm_config
    from lmforge.finetune.vlm import with_image_token
    from lmforge.modeldir import save_model

    tokenizer = with_image_token(bpe_tokenizer)
    cfg = resolve_vlm_config({"preset": "vlm-tiny", "image_token_id": tokenizer.vocab_size - 1,
                              "text": {"vocab_size": tokenizer.vocab_size}})
    model = _perturb(VLM(cfg))
    model.tie_weights()
    save_model(tmp_path / "ours", model, tokenizer)
    out = export_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (out / "preprocessor_config.json").exists()  # no transformers processor fits
    theirs = transformers.Idefics3ForConditionalGeneration.from_pretrained(out).eval()
    tokens = torch.tensor([[5, *[cfg.image_token_id] * 8, 6, 7]])
    pixels = torch.randn(2, 3, 32, 32)
    expected = theirs(input_ids=tokens, pixel_values=pixels[None]).logits
    torch.testing.assert_close(model(tokens, images=pixels), expected, atol=1e-5, rtol=1e-5)

    conv = VLM(replace(cfg, vision=replace(cfg.vision, stem="conv")))
    save_model(tmp_path / "conv", conv, tokenizer)
    with pytest.raises(UnsupportedModel, match="vision stem='conv'.*stem=patch"):
        export_hf(tmp_path / "conv", tmp_path / "hf-conv")
    normed = VLM(replace(cfg, vision=replace(cfg.vision, per_image_norm=True)))
    save_model(tmp_path / "normed", normed, tokenizer)
    with pytest.raises(UnsupportedModel, match="per_image_norm=True"):
        export_hf(tmp_path / "normed", tmp_path / "hf-normed")


def test_settings_lmforge_does_not_compute_are_refused_by_name():
    base = hf_config(500, 400).to_dict()
    with pytest.raises(UnsupportedModel, match="vision_config.hidden_act='gelu'"):
        config_from_hf({**base, "vision_config": vision_config(hidden_act="gelu")})
    with pytest.raises(UnsupportedModel, match="text_config.model_type='qwen3'"):
        config_from_hf({**base, "text_config": {**base["text_config"], "model_type": "qwen3"}})
    # 304 / 8 = 38 patches a side: transformers puts two patches on one learned position.
    with pytest.raises(UnsupportedModel, match=r"38 x 38 patches \(image_size 304"):
        config_from_hf({**base, "vision_config": vision_config(image_size=304)})


def test_an_idefics3_directory_without_its_processor_is_refused(hf_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    for name in ("preprocessor_config.json", "processor_config.json"):
        (copy / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="neither preprocessor_config.json nor "
                                                "processor_config.json"):
        import_hf(copy, tmp_path / "out")


def test_load_image_is_what_the_processor_prepares(ours, tmp_path):
    path = tmp_path / "p.png"
    picture(50, 20).save(path)
    assert torch.equal(ours.processor.prepare(load_image(path)).pixels,
                       ours.processor.pixels(picture(50, 20)).pixels)


def test_training_an_imported_model_sees_images_as_transformers(hf, ours, tmp_path):
    """The vlm task on an imported model: its rows are transformers' tokens for the
    conversation, its tiles transformers' pixels, and its checkpoints keep the processor."""
    from lmforge.modeldir import checkpoint_dirs
    from lmforge.train.config import load_recipe
    from lmforge.train.trainer import Trainer
    from tests.test_vlm_task import colour_data

    data = colour_data(tmp_path, 4)
    cfg = load_recipe(None, ["task=vlm", f"data={data}", f"init_from={ours.directory}",
                             f"out_dir={tmp_path / 'run'}", "max_steps=1", "batch_size=2",
                             "eval_batches=0", "val_fraction=0.5", "progress=false",
                             "sample_tokens=4"])
    trainer = Trainer(cfg)
    x, _, paths = trainer.task.examples[0]
    conversation = next(c for c in map(json.loads, open(data))
                        if tmp_path / c["images"][0] == paths[0])
    image = Image.open(paths[0])
    _, processor = hf
    # As parts: SmolVLM's template writes nothing for a string content.
    messages = [{**m, "content": [{"type": "text", "text": m["content"]}]}
                if isinstance(m["content"], str) else m for m in conversation["messages"]]
    theirs = processor(text=processor.apply_chat_template(messages), images=[[image]],
                       return_tensors="pt")
    # The row ends with the end of the answer (<end_of_utterance>, then the template's "\n"),
    # and its inputs are all tokens but the last.
    assert x == theirs["input_ids"][0].tolist()[:-2]
    pixels = trainer.task.collate(trainer.task.examples[:1])[3]
    assert torch.equal(pixels, theirs["pixel_values"][0])
    trainer.fit()
    again = open_model(checkpoint_dirs(tmp_path / "run")[-1], "cpu", "fp32")
    assert again.processor == ours.processor


@torch.no_grad()
def test_the_server_answers_image_messages_as_transformers_generates(hf, ours):
    import base64
    import io

    import openai

    from lmforge.serve.app import ServeConfig, create_app
    from tests.test_serve import NAME, serving

    model, processor = hf
    image = picture(300, 200, seed=4)
    theirs = transformers_inputs(processor, asking(1, "Describe it."), [image])
    generated = model.generate(**theirs, max_new_tokens=6, do_sample=False)
    expected = processor.tokenizer.decode(generated[0, theirs["input_ids"].shape[1]:])
    png = io.BytesIO()
    image.save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    app = create_app(ours.model, ours.tokenizer, (), ServeConfig(NAME, max_batch=2),
                     ours.processor)
    with serving(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=NAME, max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": [
                                                   {"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "Describe it."}]}])
    assert reply.choices[0].message.content == expected
