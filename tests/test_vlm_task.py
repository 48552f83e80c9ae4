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
