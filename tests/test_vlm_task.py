"""Training a vision-language model (`task: vlm`): data checks and a tiny model that learns
to see."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lmforge.errors import ConfigError
from lmforge.finetune.vlm import read_image_conversations
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
