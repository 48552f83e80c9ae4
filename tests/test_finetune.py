"""Fine-tuning: the SFT loss mask, LoRA (init, merge, PEFT interop, resume), classification,
and clear errors on bad data."""

import json
import random

import pytest
import torch

from lmforge.chat import render_chat
from lmforge.cli import main
from lmforge.errors import CheckpointMismatch, ConfigError
from lmforge.finetune.classify import load_classifier, predict
from lmforge.finetune.run import finetune_recipe, merge
from lmforge.finetune.sft import encode_conversation, read_conversations
from lmforge.lora import LoraConfig, apply_lora, lora_layers, merge_lora, save_adapter
from lmforge.modeldir import checkpoint_dirs
from lmforge.open import open_model
from lmforge.tokenizer import SpecialTokens, Tokenizer
from lmforge.train.trainer import Trainer

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who is the king?"},
    {"role": "assistant", "content": "Richard, of that name the second."},
    {"role": "user", "content": "And the queen?"},
    {"role": "assistant", "content": "She weeps at Windsor."},
]
# Zephyr's layout: a template unlike ChatML, ending a turn with the EOS token.
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def scored_runs(ids, scored):
    runs, current = [], []
    for token, s in zip(ids, scored):
        if s:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", [None, ZEPHYR], ids=["chatml", "zephyr"])
def test_loss_mask_covers_exactly_the_assistant_turns(bpe_tokenizer, template):
    special = SpecialTokens.from_json({**bpe_tokenizer.special.to_json(), "chat_template": template})
    tok = Tokenizer(bpe_tokenizer.backend, special)
    ids, scored = encode_conversation(tok, CONVERSATION)
    rendered = render_chat(tok, CONVERSATION, add_generation_prompt=False)
    assert tok.decode(ids) == rendered.rstrip()  # nothing lost or added
    end = "<|im_end|>" if template is None else tok.special.eos_token
    assert [tok.decode(run) for run in scored_runs(ids, scored)] == [
        "Richard, of that name the second." + end, "She weeps at Windsor." + end]
    # The unscored part before an answer is exactly what the model is prompted with.
    first = scored.index(True)
    prompt = render_chat(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert ids[:first] == tok.encode(prompt)


def test_fresh_lora_changes_nothing_and_merging_changes_nothing(bpe_tokenizer, tiny_llama):
    model = tiny_llama(bpe_tokenizer.vocab_size, 64)
    x = torch.randint(0, bpe_tokenizer.vocab_size, (2, 20))
    before = model(x)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8))
    assert len(names) == 2 * 7  # every linear layer of both blocks
    assert torch.equal(model(x), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    adapted = model(x)
    assert (adapted - before).abs().max() > 1e-2
    merge_lora(model)
    assert not lora_layers(model) and "blocks.0.attn.q_proj.weight" in model.state_dict()
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_peft_loads_our_adapter_onto_the_exported_base(tmp_path, base_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lmforge.interop.hf import export_hf

    opened = open_model(base_dir)
    model, tok = opened.model, opened.tokenizer
    apply_lora(model, LoraConfig(rank=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.2)
    save_adapter(tmp_path / "adapter", model, LoraConfig(4, 16, targets=["q_proj", "v_proj",
                                                                         "down_proj"]), str(base_dir))
    hf = AutoModelForCausalLM.from_pretrained(export_hf(base_dir, tmp_path / "hf"),
                                              torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, tok.vocab_size, (2, 24))
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
        ours = model(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # And back: our loader reads the adapter PEFT would write, onto our own model.
    loaded = open_model(base_dir, adapter=tmp_path / "adapter").model
    torch.testing.assert_close(loaded(x), ours, atol=1e-6, rtol=1e-6)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def repeat_data(tmp_path, n=96):
    rng = random.Random(0)
    words = "king queen duke lord lady knight page fool".split()
    rows = []
    for _ in range(n):
        w = rng.choice(words)
        rows.append({"prompt": f"Say {w} twice.", "completion": f"{w} {w}"})
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def sft_recipe(base_dir, data, out, **extra):
    overrides = dict(out_dir=str(out), max_steps=24, epochs=0, lr=2e-2, batch_size=8,
                     eval_interval=12, progress=False, sample_tokens=0, log_interval=1,
                     lora_rank=8) | extra
    return finetune_recipe(str(base_dir), str(data), None,
                           [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def losses(run):
    return {r["step"]: r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl")
                                                     .read_text().splitlines()) if "train_loss" in r}


def test_lora_sft_learns_resumes_exactly_and_merges(tmp_path, base_dir):
    data = repeat_data(tmp_path)
    straight = Trainer(sft_recipe(base_dir, data, tmp_path / "a")).fit()
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in metrics if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.5
    checkpoint = checkpoint_dirs(tmp_path / "a")[-1]
    assert (checkpoint / "adapter_config.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # only the adapter is saved
    # The run directory is a model: the base with the adapter on it.
    opened = open_model(tmp_path / "a")
    tuned, tok = opened.model, opened.tokenizer
    Trainer(sft_recipe(base_dir, data, tmp_path / "b", halt_at=12)).fit()
    Trainer(sft_recipe(base_dir, data, tmp_path / "b"), resume=True).fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    merged_dir = merge(tmp_path / "a", tmp_path / "merged")
    merged = open_model(merged_dir).model
    x = torch.tensor([tok.encode("Say king twice.")])
    torch.testing.assert_close(merged(x), tuned(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointMismatch, match="rank 8"):
        Trainer(sft_recipe(base_dir, data, tmp_path / "a", lora_rank=4), resume=True)
    assert straight.final_metrics["val_loss"] == vals[-1]


def test_cli_finetune_then_generate_with_adapter(tmp_path, base_dir, capsys):
    data = repeat_data(tmp_path, 32)
    run = tmp_path / "run"
    assert main(["finetune", str(base_dir), "--data", str(data), "--out", str(run),
                 "--max-steps", "4", "--lora-rank", "4", "progress=false", "sample_tokens=0"]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    adapter = checkpoint_dirs(run)[-1]
    assert main(["generate", str(base_dir), "--adapter", str(adapter), "--prompt", "Say",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "Say", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == with_adapter


def separable_rows(n, seed):
    """Label = which word family starts the line; the rest is noise from Shakespeare's words."""
    rng = random.Random(seed)
    first = {"royal": ["king", "queen", "prince"], "rustic": ["shepherd", "farmer", "miller"]}
    noise = "the of and to my a in that is not with me it be".split()
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(first))
        words = [rng.choice(first[label])] + [rng.choice(noise) for _ in range(rng.randint(3, 8))]
        rows.append({"text": " ".join(words), "label": label})
    return rows


def test_classifier_learns_a_separable_task(tmp_path, base_dir, capsys):
    rows = separable_rows(240, 0)
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    cfg = finetune_recipe(str(base_dir), str(data), None, [
        "task=classify", "lora_rank=0", "lr=3e-3", "min_lr=3e-4", "epochs=0", "max_steps=60",
        "batch_size=16", "eval_interval=30", "progress=false", f"out_dir={tmp_path / 'run'}"])
    result = Trainer(cfg).fit()
    assert result.final_metrics["val_acc"] == 1.0
    assert result.final_metrics["val_macro_f1"] == 1.0
    capsys.readouterr()
    model, tok = load_classifier(tmp_path / "run")
    assert model.labels == ["royal", "rustic"]
    probs = predict(model, tok, ["queen and my", "miller of the"])
    assert [next(iter(p)) for p in probs] == ["royal", "rustic"]
    assert main(["predict", str(tmp_path / "run"), "--text", "prince it be"]) == 0
    assert capsys.readouterr().out.startswith("royal\t")


def test_lora_classifier_saves_its_head_beside_the_adapter(tmp_path, base_dir):
    data = write_jsonl(tmp_path / "train.jsonl", separable_rows(64, 1))
    cfg = finetune_recipe(str(base_dir), str(data), None, [
        "task=classify", "lora_rank=4", "epochs=0", "max_steps=3", "progress=false",
        f"out_dir={tmp_path / 'run'}"])
    Trainer(cfg).fit()
    model, tok = load_classifier(tmp_path / "run")
    merged, _ = load_classifier(merge(tmp_path / "run", tmp_path / "merged"))
    texts = ["king of the", "farmer with me"]
    for a, b in zip(predict(model, tok, texts), predict(merged, tok, texts)):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"text": "hi"}', 'missing "messages"'),
    ('{"messages": [{"role": "assistnt", "content": "hi"}]}', "did you mean 'assistant'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
])
def test_bad_sft_data_names_the_line(tmp_path, line, message):
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ConfigError, match=f"bad.jsonl:3: .*{message}"):
        read_conversations(path)


def test_missing_label_column_is_named(tmp_path, base_dir):
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\nhello,a\n")
    cfg = finetune_recipe(str(base_dir), str(data), None, ["task=classify", "progress=false",
                                                           f"out_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="no column 'text'.*sentence, label.*text_field"):
        Trainer(cfg)


def test_conversations_past_the_context_are_skipped_or_truncated(tmp_path, base_dir, capsys):
    long = {"prompt": "word " * 300, "completion": "yes"}
    data = write_jsonl(tmp_path / "d.jsonl", [long] + [{"prompt": "hi", "completion": "yes"}] * 9)
    cfg = sft_recipe(base_dir, data, tmp_path / "skip", max_steps=1, val_fraction=0)
    trainer = Trainer(cfg)
    assert trainer.task.describe()["skipped_too_long"] == 1 and len(trainer.task.examples) == 9
    assert "skipped 1 conversations longer than the context" in capsys.readouterr().out
    trainer = Trainer(sft_recipe(base_dir, data, tmp_path / "cut", max_steps=1, val_fraction=0,
                                 truncate=True))
    assert len(trainer.task.examples) == 9  # cut to the context, the answer was lost: dropped
    assert trainer.task.describe()["truncated"] == 1


def test_sft_loss_reads_logits_only_where_targets_are_scored(tmp_path, base_dir):
    trainer = Trainer(sft_recipe(base_dir, repeat_data(tmp_path, 16), tmp_path / "r",
                                 max_steps=1, val_fraction=0))
    x, y, lengths = trainer.task.train_batch(0, 0)
    assert int(lengths.sum()) == trainer.task.tokens((x, y, lengths)) <= x.numel()
    full = torch.nn.functional.cross_entropy(trainer.model(x).flatten(0, 1), y.flatten(),
                                             ignore_index=-100)
    torch.testing.assert_close(trainer.task.loss(trainer.model, (x, y, lengths)), full)
