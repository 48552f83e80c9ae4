"""Training a vision-language model (`task: vlm`): data checks, a tiny model that learns
to see, LoRA on a pretrained decoder (checkpoints, resume, adapter on and off, merge) and the
two stages of teaching a language model to see."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lmforge.chat import IMAGE_TOKEN, chat_prompt_ids
from lmforge.cli import main
from lmforge.compress.quant import QuantizationError, QuantSpec
from lmforge.compress.run import quantize_dir
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.files import load_safetensors
from lmforge.finetune.run import merge
from lmforge.finetune.vlm import read_image_conversations
from lmforge.lora import lora_layers
from lmforge.modeldir import WEIGHTS, checkpoint_dirs, save_model
from lmforge.open import open_model
from lmforge.train.config import load_recipe
from lmforge.train.trainer import Trainer

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}


def colour_data(folder, n: int) -> str:
    """n conversations "What colour is the image?" about solid squares, a JSONL path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    names = list(COLOURS)
    for i in range(n):
        name = names[i % len(names)]
        Image.new("RGB", (40, 40), COLOURS[name]).save(folder / "images" / f"{i}.png")
        lines.append(json.dumps({"images": [f"images/{i}.png"], "messages": [
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "content": name}]}))
    path = folder / "colours.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_lines_and_missing_images_are_named(tmp_path):
    data = colour_data(tmp_path, 3)
    lines = open(data).read().splitlines()
    broken = json.loads(lines[1])
    broken["images"] = ["images/nope.png"]
    (tmp_path / "missing.jsonl").write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(FileNotFoundError, match=r"missing.jsonl:2: image .*nope.png not found"):
        read_image_conversations(tmp_path / "missing.jsonl")
    broken = json.loads(lines[0])
    broken["images"] = []
    (tmp_path / "count.jsonl").write_text(json.dumps(broken) + "\n")
    with pytest.raises(ConfigError, match=r"count.jsonl:1: 1 image part\(s\) .* for 0 image"):
        read_image_conversations(tmp_path / "count.jsonl")


@pytest.mark.slow
def test_a_tiny_vlm_learns_the_colour_of_an_image(tmp_path):
    data = colour_data(tmp_path, 60)
    cfg = load_recipe(None, ["task=vlm", f"data={data}", "model=vlm-tiny", "vocab_size=300",
                             f"out_dir={tmp_path / 'run'}", "max_steps=80", "batch_size=8",
                             "lr=3e-3", "min_lr=3e-4", "warmup_steps=10", "eval_interval=40",
                             "eval_batches=0", "val_fraction=0.2", "progress=false",
                             "sample_tokens=8", "lr_scales={projector: 3.0}"])
    result = Trainer(cfg).fit()
    assert result.final_metrics["val_exact"] == 1.0


@pytest.mark.slow
def test_generate_and_chat_read_images_with_a_trained_vlm(tmp_path, capsys):
    """A tiny VLM learns colours; then `lmforge generate --chat --image` and a chat session
    with /image answer from the image, and a text-only question gets no image."""
    from lmforge.chat import ChatSession, run_terminal_chat
    from lmforge.cli import main
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.open import open_model

    data = colour_data(tmp_path, 60)
    cfg = load_recipe(None, ["task=vlm", f"data={data}", "model=vlm-tiny", "vocab_size=300",
                             f"out_dir={tmp_path / 'run'}", "max_steps=80", "batch_size=8",
                             "lr=3e-3", "warmup_steps=10", "eval_interval=0",
                             "val_fraction=0.2", "progress=false", "sample_tokens=8"])
    Trainer(cfg).fit()
    capsys.readouterr()
    for name in COLOURS:
        Image.new("RGB", (48, 48), COLOURS[name]).save(tmp_path / f"{name}.png")
        assert main(["generate", str(tmp_path / "run"), "--chat", "--image",
                     str(tmp_path / f"{name}.png"), "--prompt", "What colour is it?",
                     "--temperature", "0", "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip() == name
    opened = open_model(tmp_path / "run")
    session = ChatSession(opened.model, opened.tokenizer, opened.stop_ids,
                          SamplingConfig(temperature=0), max_new_tokens=4)
    lines = iter([f"/image {tmp_path / 'blue.png'}", "What colour is it?", "/image nope.png",
                  "/quit"])
    out = tmp_path / "chat.txt"
    with open(out, "w") as f:
        run_terminal_chat(session, read=lambda _: next(lines), out=f)
    said = out.read_text()
    assert "goes with your next message" in said and "\nblue\n" in said
    assert "no image attached" in said and "nope.png" in said
    assert main(["generate", str(tmp_path / "run"), "--image", "nope.png"]) == 2
    assert "nope.png" in capsys.readouterr().err
    # VQA-style evaluation: examples with images, answers by exact match.
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("".join(json.dumps({"prompt": "What colour is it?", "answer": name,
                                       "images": [f"{name}.png"]}) + "\n" for name in COLOURS))
    assert main(["eval", str(tmp_path / "run"), "--task", "generation", "--data", str(vqa),
                 "--chat", "--max-new-tokens", "4", "--quiet"]) == 0
    assert "exact_match  1.0000  3 examples" in capsys.readouterr().out


def test_vision_aux_has_each_lone_image_name_its_answer(tmp_path):
    """`vision_aux`: in training, an image alone in its conversation is also scored on naming
    its answer's tokens straight from its features; the images of a two-image question are
    not, and validation scores the answers alone."""
    data = colour_data(tmp_path, 6)
    two = {"images": ["images/0.png", "images/1.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "Which one is red?"}]},
        {"role": "assistant", "content": "the first"}]}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(open(data).read() + json.dumps(two) + "\n")
    cfg = load_recipe(None, ["task=vlm", f"data={mixed}", f"val_data={mixed}", "model=vlm-tiny",
                             "vocab_size=300", f"out_dir={tmp_path / 'run'}", "vision_aux=0.5",
                             "progress=false"])
    trainer = Trainer(cfg)
    task, model = trainer.task, trainer.model
    batch = task.collate(task.examples)
    x, y, _, pixels, named = batch
    assert named.shape[0] == 8
    bags = torch.zeros(6, task.model_cfg.vocab_size)
    for row in range(6):
        answer = task.tokenizer.encode(list(COLOURS)[row % 3])
        assert named[row].tolist() == answer + [-1] * (named.shape[1] - len(answer))
        bags[row, answer] = 1 / len(set(answer))
    assert (named[6:] == -1).all()

    scored = y != -100
    logits, words = model(x, select=scored, images=pixels, image_words="pooled")
    lone = -(bags * torch.log_softmax(words[:6], -1)).sum(-1).mean()
    answers = torch.nn.functional.cross_entropy(logits, y[scored])
    torch.testing.assert_close(task.loss(model.train(), batch), answers + 0.5 * lone)
    torch.testing.assert_close(task.loss(model.eval(), batch), answers)


def test_vision_aux_columns_read_the_answer_in_order_across_the_image(tmp_path):
    """`vision_aux_columns`: the lone images name their answer's tokens left to right over
    their columns of patches (CTC, the image token as the blank); it needs vision_aux and a
    linear projector, and says so."""
    data = colour_data(tmp_path, 6)
    base = ["task=vlm", f"data={data}", f"val_data={data}", "model=vlm-tiny", "vocab_size=300",
            f"out_dir={tmp_path / 'run'}", "progress=false", "vision_aux_columns=true"]
    trainer = Trainer(load_recipe(None, base + ["vision_aux=0.5"]))
    task, model = trainer.task, trainer.model
    batch = task.collate(task.examples)
    x, y, _, pixels, named = batch
    scored = y != -100
    logits, columns = model(x, select=scored, images=pixels, image_words="columns")
    assert columns.shape == (6, 4, task.model_cfg.vocab_size)  # 32 px: 4 columns of patches
    steps = torch.log_softmax(columns, -1).transpose(0, 1)
    targets = [task.tokenizer.encode(list(COLOURS)[row % 3]) for row in range(6)]
    reading = torch.nn.functional.ctc_loss(
        steps, torch.tensor([t for answer in targets for t in answer]), torch.full((6,), 4),
        torch.tensor([len(answer) for answer in targets]), blank=task.model_cfg.image_token_id)
    answers = torch.nn.functional.cross_entropy(logits, y[scored])
    torch.testing.assert_close(task.loss(model.train(), batch), answers + 0.5 * reading)

    with pytest.raises(ConfigError, match="set vision_aux > 0"):
        Trainer(load_recipe(None, base))
    with pytest.raises(ConfigError, match="model.projector: linear"):
        Trainer(load_recipe(None, base + ["vision_aux=1", "model.projector=mlp"]))


# LoRA on a vision-language model made from a pretrained decoder ------------------------------


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory, bpe_tokenizer, tiny_llama):
    """A tiny random decoder saved as a model directory: the "pretrained" language model."""
    directory = tmp_path_factory.mktemp("decoder")
    save_model(directory, tiny_llama(bpe_tokenizer.vocab_size, 128), bpe_tokenizer)
    return directory


def vlm_recipe(init_from, data, out, **extra):
    overrides = dict(task="vlm", data=str(data), init_from=str(init_from), model="vlm-tiny",
                     out_dir=str(out), max_steps=4, batch_size=4, lr=2e-2, warmup_steps=0,
                     eval_interval=4, eval_batches=1, val_fraction=0.2, progress=False,
                     sample_tokens=0,
                     log_interval=1, lora_rank=4) | extra
    return load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def train_losses(run):
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def text_weights(directory):
    """The decoder's tensors of a model directory's weights file, by the decoder's names."""
    return {k.removeprefix("text."): v
            for k, v in load_safetensors(directory / WEIGHTS).items() if k.startswith("text.")}


def image_batch(tokenizer, cfg):
    """A chat prompt with one image (ids (1, T)) and the image (1, 3, size, size)."""
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": IMAGE_TOKEN
                                          * cfg.image_tokens + "What colour is it?"}])
    return torch.tensor([prompt]), torch.rand(1, 3, cfg.vision.image_size,
                                              cfg.vision.image_size)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, decoder_dir):
    """A LoRA run on a vision-language model made from the decoder: (run directory, data)."""
    root = tmp_path_factory.mktemp("lora-vlm")
    data = colour_data(root, 24)
    Trainer(vlm_recipe(decoder_dir, data, root / "run")).fit()
    return root / "run", data


def test_a_lora_vlm_run_resumes_exactly_with_its_own_settings(tmp_path, decoder_dir, lora_run):
    run, data = lora_run
    Trainer(vlm_recipe(decoder_dir, data, tmp_path / "b", halt_at=2)).fit()
    Trainer(vlm_recipe(decoder_dir, data, tmp_path / "b"), resume=True).fit()
    assert train_losses(run) == train_losses(tmp_path / "b")
    with pytest.raises(CheckpointMismatch, match="rank 4 .* the recipe asks for rank 8"):
        Trainer(vlm_recipe(decoder_dir, data, run, lora_rank=8), resume=True)
    with pytest.raises(CheckpointMismatch, match="holds a LoRA adapter .* full fine-tuning"):
        Trainer(vlm_recipe(decoder_dir, data, run, lora_rank=0), resume=True)


def test_a_lora_vlm_opens_with_its_adapter_or_without_as_the_pretrained_decoder(
        decoder_dir, lora_run, capsys):
    run, data = lora_run
    # A checkpoint: the model the adapters sit on, whose decoder is the pretrained one with
    # the image token's row added, and the adapters beside it.
    checkpoint = checkpoint_dirs(run)[-1]
    assert {"config.json", "model.safetensors", "adapter_config.json",
            "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    base = load_safetensors(decoder_dir / WEIGHTS)
    saved = text_weights(checkpoint)
    assert set(saved) == set(base)
    for name, tensor in base.items():
        assert torch.equal(saved[name][:len(tensor)], tensor), name

    tuned = open_model(run, "cpu")
    plain = open_model(run, "cpu", adapter=False)
    adapted = set(lora_layers(tuned.model))
    assert "text.blocks.0.attn.q_proj" in adapted and not lora_layers(plain.model)
    assert not any(name.startswith("vision.") for name in adapted)
    x, image = image_batch(tuned.tokenizer, tuned.model.cfg)
    with torch.no_grad():
        on, off = tuned.model(x, images=image), plain.model(x, images=image)
    assert (on - off).abs().max() > 1e-3  # the adapter was trained: it matters

    # Adapter off, no image: the pretrained decoder's logits and greedy text (the CLI's).
    text_only = torch.tensor([tuned.tokenizer.encode("KING RICHARD: my lord")])
    with torch.no_grad():
        pretrained = open_model(decoder_dir, "cpu").model(text_only)
        assert torch.equal(plain.model(text_only)[..., :pretrained.shape[-1]], pretrained)
    capsys.readouterr()
    said = []
    for model, flags in ((decoder_dir, []), (run, ["--no-adapter"])):
        assert main(["generate", str(model), *flags, "--prompt", "KING RICHARD", "--temperature",
                     "0", "--max-new-tokens", "24"]) == 0
        said.append(capsys.readouterr().out)
    assert said[0] == said[1] and len(said[0]) > len("KING RICHARD\n")
    image_file = run.parent / "images" / "0.png"
    assert main(["generate", str(run), "--chat", "--image", str(image_file), "--prompt",
                 "What colour is it?", "--max-new-tokens", "4"]) == 0


def test_a_lora_vlm_merges_and_quantizes_with_its_adapter_folded_in(tmp_path, lora_run, capsys):
    run, _ = lora_run
    tuned = open_model(run, "cpu")
    x, image = image_batch(tuned.tokenizer, tuned.model.cfg)
    with torch.no_grad():
        on = tuned.model(x, images=image)
    # Merged: a plain model computing what the adapted one does.
    merged_dir = merge(run, tmp_path / "merged")
    assert not (merged_dir / "adapter_config.json").exists()
    merged = open_model(merged_dir, "cpu").model
    assert not lora_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, images=image), on, atol=1e-5, rtol=1e-5)

    # Quantized: the adapters folded in first (the weights alone would lose them).
    with pytest.raises(QuantizationError, match="holds a LoRA adapter: fold it in first"):
        quantize_dir(checkpoint_dirs(run)[-1], tmp_path / "lost", QuantSpec(8))
    assert main(["quantize", str(run), "--bits", "8", "--out", str(tmp_path / "int8")]) == 0
    with torch.no_grad():
        quantized = open_model(tmp_path / "int8", "cpu").model(x, images=image)
    assert (quantized - on).norm() < 0.02 * on.norm()

    assert main(["info", str(run)]) == 0
    info = capsys.readouterr().out
    assert "per image" in info and "LoRA adapter     rank 4 (alpha 32)" in info


def test_stage_one_trains_the_projector_alone_and_stage_two_adds_lora(tmp_path, decoder_dir):
    """Stage 1: a fresh projector between a frozen encoder and a frozen decoder. Stage 2,
    from stage 1: adapters on the decoder's and the projector's layers."""
    data = colour_data(tmp_path, 16)
    stage1 = Trainer(vlm_recipe(decoder_dir, data, tmp_path / "one", lora_rank=0, max_steps=2,
                                eval_interval=2, freeze=["vision", "text"],
                                lr_scales={"projector": 10}))
    trainable = {n.partition(".")[0] for n, p in stage1.model.named_parameters()
                 if p.requires_grad}
    assert trainable == {"projector"}
    stage1.fit()
    one = checkpoint_dirs(tmp_path / "one")[-1]
    assert not (one / "adapter_config.json").exists()
    base = load_safetensors(decoder_dir / WEIGHTS)
    assert all(torch.equal(text_weights(one)[k][:len(v)], v) for k, v in base.items())

    stage2 = Trainer(vlm_recipe(tmp_path / "one", data, tmp_path / "two", max_steps=2,
                                eval_interval=2, freeze=["vision"],
                                lora_targets="q_proj,v_proj,proj"))
    trainable = {n for n, p in stage2.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert "projector.proj.lora_A.weight" in trainable
    stage2.fit()
    two = checkpoint_dirs(tmp_path / "two")[-1]
    before, after = load_safetensors(one / WEIGHTS), load_safetensors(two / WEIGHTS)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # all in the adapters
    adapter = load_safetensors(two / "adapter_model.safetensors")
    assert any(".projector.proj.lora_B" in k for k in adapter)
    assert any(k for k in adapter if k.startswith("base_model.model.text.blocks.0.attn.q_proj"))


def test_lora_needs_a_pretrained_model(tmp_path):
    data = colour_data(tmp_path, 4)
    cfg = load_recipe(None, ["task=vlm", f"data={data}", "model=vlm-tiny", "vocab_size=300",
                             f"out_dir={tmp_path / 'run'}", "lora_rank=4", "progress=false"])
    with pytest.raises(ConfigError, match="LoRA adapts a pretrained model .* set init_from"):
        Trainer(cfg)


def test_an_encoder_from_another_model_must_have_the_recipe_s_vision_settings(tmp_path,
                                                                             decoder_dir):
    from lmforge.config import resolve_vlm_config
    from lmforge.models.vlm import VLM

    donor = tmp_path / "donor"
    save_model(donor, VLM(resolve_vlm_config({"preset": "vlm-tiny", "vision": {"stem": "conv"}})),
               None)
    data = colour_data(tmp_path, 8)
    with pytest.raises(CheckpointMismatch, match="stem: 'conv' there, 'patch' here"):
        Trainer(vlm_recipe(decoder_dir, data, tmp_path / "run", lora_rank=0,
                           vision_from=str(donor)))
    match = vlm_recipe(decoder_dir, data, tmp_path / "run", lora_rank=0, vision_from=str(donor),
                       model={"preset": "vlm-tiny", "vision": {"stem": "conv"}})
    trainer = Trainer(match)
    expected = open_model(donor).model.vision.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in trainer.model.vision.state_dict().items())
