"""The evaluation suite on a tiny real model: perplexity and multiple choice against direct
computations from logits, generation against greedy decoding done by hand, the `lmforge`
model type of lm-evaluation-harness against lmforge's own evaluators, `lmforge eval`, and
errors that name the line."""

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmforge.chat import chat_prompt_ids
from lmforge.cli import main
from lmforge.eval import (
    ChoiceExample,
    EvalDataError,
    GenerationExample,
    encode_pair,
    evaluate_choice,
    evaluate_generation,
    evaluate_perplexity,
    perplexity,
    read_choice_examples,
    read_generation_examples,
    read_text,
)
from lmforge.modeldir import save_model
from lmforge.tokenizer import train_char

CONTEXT = 128

QUESTIONS = [
    ("The king of Denmark's son is named", ["Hamlet", "Romeo", "Lear", "Othello"], 0),
    ("Wherefore art thou ", ["Romeo", "Hamlet", "Macbeth", "Puck"], 0),  # trailing space
    ("To be, or not to", ["be", "see", "go", "sing"], 0),
    ("Now is the winter of our", ["discontent", "summer", "kingdom", "castle"], 1),
    ("A horse! a horse! my kingdom for a", ["horse", "crown", "sword", "cat"], 0),
    ("The lady doth protest too", ["much", "little", "often", "loud"], 2),
    ("Café or tea, my lord?", ["café", "tea", "ale", "wine à la carte"], 1),  # bytes != chars
    ("All the world's a", ["stage", "house", "sea", "song"], 3),
]
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING RICHARD"]


@pytest.fixture(scope="module")
def tiny(bpe_tokenizer, tiny_llama):
    return tiny_llama(bpe_tokenizer.vocab_size, CONTEXT), bpe_tokenizer


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    model, tokenizer = tiny
    return save_model(tmp_path_factory.mktemp("eval-model"), model, tokenizer)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def choice_examples():
    return [ChoiceExample(q, c, a, line=i + 1) for i, (q, c, a) in enumerate(QUESTIONS)]


def next_token_logprobs(model, ids):
    """log P(next token | ids), one forward pass, no cache."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), dim=-1)


# ----------------------------------------------------------------------------- perplexity

def direct_nll(model, ids, window, stride):
    """Each token's NLL from its own forward pass over what the first window holding it (not
    as its first token) has before it; tokens no window scores are left out."""
    nll, count = 0.0, 0
    for p in range(1, len(ids)):
        begins = [b for b in range(0, p, stride) if p < b + window]
        if begins:
            nll -= next_token_logprobs(model, ids[begins[0]:p])[ids[p]].item()
            count += 1
    return nll, count


@pytest.mark.parametrize("window, stride", [(CONTEXT, None), (32, None), (32, 12)])
def test_perplexity_and_bits_per_byte_equal_a_direct_computation(tiny, shakespeare, window,
                                                                 stride):
    model, tokenizer = tiny
    text = shakespeare[:200]
    ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    assert len(ids) <= CONTEXT  # one window holds it all when window = CONTEXT
    result = evaluate_perplexity(model, tokenizer, text, window=window, stride=stride,
                                 batch_size=3)
    nll, count = direct_nll(model, ids, window, stride or window - 1)
    assert result.n == count == len(ids) - 1  # every token of the text, the first after BOS
    assert result.metrics["nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.metrics["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / len(text.encode("utf-8")), rel=1e-5)


def test_perplexity_of_ids_keeps_disjoint_windows_that_skip_each_first_token(tiny, shakespeare):
    model, tokenizer = tiny
    ids = tokenizer.encode(shakespeare[:200])
    ppl, count = perplexity(model, ids, window=32)
    nll, expected = direct_nll(model, ids, 32, 32)
    assert count == expected == len(ids) - math.ceil(len(ids) / 32)
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_without_a_bos_token_leaves_the_first_token_and_its_bytes_out(tiny_llama):
    text = "To be, or not to be: that is the question. Café au lait."
    tokenizer = train_char(text)
    model = tiny_llama(tokenizer.vocab_size, 64)
    ids = tokenizer.encode(text)
    result = evaluate_perplexity(model, tokenizer, text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].double(), dim=-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
    assert result.n == len(ids) - 1
    assert result.details["bytes"] == len(text.encode("utf-8")) - 1  # "T" is not scored
    assert result.metrics["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / (len(text.encode("utf-8")) - 1), rel=1e-6)


# -------------------------------------------------------------------------- multiple choice

def direct_choice_logliks(model, tokenizer, context, choices):
    """Summed log P(" " + choice | context), tokenized as lm-eval does, by hand."""
    spaces = len(context) - len(context.rstrip())
    context, moved = context.rstrip(), context[len(context.rstrip()):]
    assert len(moved) == spaces
    context_ids = tokenizer.encode(context)
    row = []
    for choice in choices:
        whole = tokenizer.encode(context + moved + " " + choice)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole]))[0].double(), dim=-1)
        positions = torch.arange(len(context_ids) - 1, len(whole) - 1)
        row.append(logp[positions, torch.tensor(whole[len(context_ids):])].sum().item())
    return row


def test_encode_pair_moves_the_context_s_trailing_space_and_splits_the_whole_encoding(tiny):
    _, tokenizer = tiny
    context, continuation = encode_pair(tokenizer, "Wherefore art thou ", " Romeo")
    assert context == tokenizer.encode("Wherefore art thou")
    assert context + continuation == tokenizer.encode("Wherefore art thou  Romeo")
    # An empty context is the BOS token, as the harness's prefix_token_id.
    assert encode_pair(tokenizer, "", " Romeo") == ([tokenizer.bos_id],
                                                    tokenizer.encode(" Romeo"))


def test_multiple_choice_equals_a_direct_computation(tiny):
    model, tokenizer = tiny
    result = evaluate_choice(model, tokenizer, choice_examples(), batch_size=5)
    direct = [direct_choice_logliks(model, tokenizer, q, c) for q, c, _ in QUESTIONS]
    ours = [s["logliks"] for s in result.samples]
    np.testing.assert_allclose(ours, direct, atol=1e-4)
    answers = np.array([a for _, _, a in QUESTIONS])
    chars = [np.array(row) / [len(c) for c in choices]
             for row, (_, choices, _) in zip(direct, QUESTIONS)]
    per_byte = [np.array(row) / [len(c.encode()) for c in choices]
                for row, (_, choices, _) in zip(direct, QUESTIONS)]
    assert result.n == len(QUESTIONS)
    assert result.metrics["acc"] == np.mean([np.argmax(r) for r in direct] == answers)
    assert result.metrics["acc_norm"] == np.mean([np.argmax(r) for r in chars] == answers)
    assert result.metrics["acc_bytes"] == np.mean([np.argmax(r) for r in per_byte] == answers)


# ------------------------------------------------------------------------------- generation

def greedy_by_hand(model, tokenizer, prompt, max_new_tokens, stop=()):
    """Greedy text after a prompt (text or ids), one full forward pass per token, cut at a
    stop string."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    new = []
    for _ in range(max_new_tokens):
        token = int(next_token_logprobs(model, ids + new).argmax())
        if token == tokenizer.eos_id:
            break
        new.append(token)
    text = tokenizer.decode(new)
    cuts = [text.find(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def test_generation_exact_match_and_regex_scores_known_answers(tiny):
    model, tokenizer = tiny
    outputs = [greedy_by_hand(model, tokenizer, p, 12, ["\n"]) for p in PROMPTS]
    assert all(o.strip() for o in outputs), outputs  # something to compare with
    # Right answers for the first two prompts (with extra spaces: stripped), wrong for the rest.
    answers = [f"  {outputs[0]} ", outputs[1], "not this", outputs[3] + "x"]
    examples = [GenerationExample(p, a) for p, a in zip(PROMPTS, answers)]
    exact = evaluate_generation(model, tokenizer, examples, max_new_tokens=12, stop=["\n"],
                                stop_ids=(tokenizer.eos_id,), batch_size=3)
    assert [s["output"] for s in exact.samples] == outputs
    assert exact.metrics["exact_match"] == 0.5 and exact.n == 4

    # The regex's group (the output's first non-space run) is what must match; one answer
    # is in capitals, right only when case is ignored.
    firsts = [o.split()[0] for o in outputs]
    cased = next(i for i, first in enumerate(firsts) if first.upper() != first)
    answers = [first.upper() if i == cased else first for i, first in enumerate(firsts)]
    examples = [GenerationExample(p, a) for p, a in zip(PROMPTS, answers)]
    regex = evaluate_generation(model, tokenizer, examples, max_new_tokens=12, stop=["\n"],
                                regex=r"(\S+)")
    assert [s["prediction"] for s in regex.samples] == firsts
    assert regex.metrics["exact_match"] == 0.75
    blind = evaluate_generation(model, tokenizer, examples, max_new_tokens=12, stop=["\n"],
                                regex=r"(\S+)", ignore_case=True)
    assert blind.metrics["exact_match"] == 1.0
    # --chat: the prompt is the user's message in the chat template (ChatML here).
    chat = evaluate_generation(model, tokenizer, examples[:2], max_new_tokens=6, chat=True,
                               stop_ids=(tokenizer.eos_id,))
    assert [s["output"] for s in chat.samples] == [
        greedy_by_hand(model, tokenizer, chat_prompt_ids(tokenizer, [{"role": "user",
                                                                      "content": p}]), 6)
        for p in PROMPTS[:2]]
    # No match is a wrong answer, not an error.
    none = evaluate_generation(model, tokenizer, examples[:1], max_new_tokens=12, stop=["\n"],
                               regex=r"(\d{9})")
    assert none.samples[0]["prediction"] is None and none.metrics["exact_match"] == 0.0


# ---------------------------------------------------------------------- lm-evaluation-harness

MC_TASK = """task: lmforge_mc
output_type: multiple_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

TEXT_TASK = """task: lmforge_text
output_type: loglikelihood_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""

GEN_TASK = """task: lmforge_gen
output_type: generate_until
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def harness_tasks(tmp_path_factory, shakespeare):
    """Local lm-eval tasks: multiple choice, a rolling text, generation."""
    root = tmp_path_factory.mktemp("harness")
    mc = write_jsonl(root / "mc.jsonl", [{"context": q, "choices": c, "answer": a}
                                         for q, c, a in QUESTIONS])
    text = write_jsonl(root / "text.jsonl", [{"text": shakespeare[:200]}])
    gen = write_jsonl(root / "gen.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS])
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "lmforge_mc.yaml").write_text(MC_TASK.format(data=mc))
    (tasks / "lmforge_text.yaml").write_text(TEXT_TASK.format(data=text))
    (tasks / "lmforge_gen.yaml").write_text(GEN_TASK.format(data=gen))
    return tasks


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_lm_eval_model_type_scores_exactly_as_our_evaluators(tiny, model_dir, harness_tasks,
                                                             shakespeare, offline_datasets):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import lmforge.eval.harness_lm  # noqa: F401  (registers the lmforge model type)

    model, tokenizer = tiny
    out = lm_eval.simple_evaluate(
        model="lmforge", model_args=f"pretrained={model_dir},device=cpu,batch_size=4",
        tasks=["lmforge_mc", "lmforge_text", "lmforge_gen"], log_samples=True,
        task_manager=TaskManager(include_path=str(harness_tasks), include_defaults=False))
    results, samples = out["results"], out["samples"]

    ours = evaluate_choice(model, tokenizer, choice_examples())
    assert results["lmforge_mc"]["acc,none"] == ours.metrics["acc"]
    assert results["lmforge_mc"]["acc_norm,none"] == ours.metrics["acc_norm"]
    theirs = sorted(samples["lmforge_mc"], key=lambda s: s["doc_id"])
    np.testing.assert_allclose([[r[0] for r in s["filtered_resps"]] for s in theirs],
                               [s["logliks"] for s in ours.samples], atol=1e-4)

    # A text in one window: the harness's rolling windows are our perplexity's.
    text = evaluate_perplexity(model, tokenizer, shakespeare[:200])
    assert results["lmforge_text"]["bits_per_byte,none"] == pytest.approx(
        text.metrics["bits_per_byte"], rel=1e-5)

    generated = evaluate_generation(model, tokenizer, [GenerationExample(p, "x") for p in PROMPTS],
                                    max_new_tokens=12, stop=["\n"], stop_ids=(tokenizer.eos_id,))
    theirs = sorted(samples["lmforge_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in theirs] == [s["output"] for s in generated.samples]


# --------------------------------------------------------------------------------- the CLI

def test_lmforge_eval_prints_a_table_and_writes_json(tiny, model_dir, tmp_path, capsys,
                                                      shakespeare):
    model, tokenizer = tiny
    data = write_jsonl(tmp_path / "mc.jsonl", [{"q": q, "options": c, "label": a}
                                               for q, c, a in QUESTIONS])
    out = tmp_path / "mc.json"
    assert main(["eval", str(model_dir), "--task", "multiple-choice", "--data", str(data),
                 "--context-field", "q", "--choices-field", "options", "--answer-field",
                 "label", "--out", str(out), "--log-samples", "--device", "cpu",
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "multiple-choice  acc_norm" in table and f"{len(QUESTIONS)} examples" in table
    saved = json.loads(out.read_text())
    expected = evaluate_choice(model, tokenizer, choice_examples())
    assert saved["model"] == str(model_dir)
    assert saved["results"]["multiple-choice"]["metrics"] == pytest.approx(expected.metrics)
    assert len(saved["results"]["multiple-choice"]["samples"]) == len(QUESTIONS)
    assert saved["config"]["context_field"] == "q"

    text = tmp_path / "text.txt"
    text.write_text(shakespeare[:2000])
    out = tmp_path / "ppl.json"
    assert main(["eval", str(model_dir), "--task", "perplexity", "--data", str(text),
                 "--max-chars", "700", "--window", "64", "--out", str(out), "--quiet"]) == 0
    saved = json.loads(out.read_text())["results"]["perplexity"]
    expected = evaluate_perplexity(model, tokenizer, shakespeare[:700], window=64)
    assert saved["metrics"] == pytest.approx(expected.metrics)
    assert saved["bytes"] == 700 and "samples" not in saved

    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "answer": "?"} for p in PROMPTS])
    out = tmp_path / "gen.json"
    assert main(["eval", str(model_dir), "--task", "generation", "--data", str(data),
                 "--stop", "\\n", "--max-new-tokens", "12", "--regex", r"(\S+)",
                 "--out", str(out), "--log-samples", "--quiet"]) == 0
    saved = json.loads(out.read_text())["results"]["generation"]
    outputs = [greedy_by_hand(model, tokenizer, p, 12, ["\n"]) for p in PROMPTS]
    assert [s["output"] for s in saved["samples"]] == outputs
    assert saved["metrics"] == {"exact_match": 0.0}


@pytest.mark.slow  # lm_eval's own command line indexes its built-in tasks: ~10 s
def test_python_m_harness_is_lm_eval_with_the_lmforge_model_type(model_dir, harness_tasks,
                                                                 tmp_path):
    pytest.importorskip("lm_eval")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    run = subprocess.run(
        [sys.executable, "-m", "lmforge.eval.harness", "--model", "lmforge", "--model_args",
         f"pretrained={model_dir},batch_size=4", "--tasks", "lmforge_mc",
         "--include_path", str(harness_tasks), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["model"] == "lmforge"
    assert "acc_norm,none" in results["results"]["lmforge_mc"]


def test_lmforge_eval_harness_runs_local_tasks(tiny, model_dir, harness_tasks, tmp_path, capsys,
                                               offline_datasets):
    pytest.importorskip("lm_eval")
    out = tmp_path / "harness.json"
    assert main(["eval", str(model_dir), "--harness", "lmforge_mc", "--include-path",
                 str(harness_tasks), "--limit", "4", "--device", "cpu", "--out", str(out)]) == 0
    assert "lmforge_mc" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    model, tokenizer = tiny
    expected = evaluate_choice(model, tokenizer, choice_examples()[:4])
    assert saved["results"]["lmforge_mc"]["acc,none"] == expected.metrics["acc"]


def test_an_adapter_reaches_the_harness_model_type_and_lmforge_eval(tiny, model_dir, tmp_path,
                                                                     capsys):
    pytest.importorskip("lm_eval")
    from lmforge.eval.harness_lm import LmforgeLM
    from lmforge.lora import LoraConfig, apply_lora, lora_layers, save_adapter

    model, tokenizer = tiny
    adapted, cfg = copy.deepcopy(model), LoraConfig(rank=2)
    apply_lora(adapted, cfg)
    torch.manual_seed(1)
    for layer in lora_layers(adapted).values():  # B starts at zero: make the adapter matter
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    adapter = save_adapter(tmp_path / "adapter", adapted, cfg, base=str(model_dir))

    lm = LmforgeLM(pretrained=str(model_dir), adapter=str(adapter), device="cpu")
    ids = torch.tensor([tokenizer.encode(QUESTIONS[0][0])])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids), adapted(ids), atol=1e-5)
        assert not torch.allclose(lm.model(ids), model(ids), atol=1e-3)

    data = write_jsonl(tmp_path / "mc.jsonl", [{"context": q, "choices": c, "answer": a}
                                               for q, c, a in QUESTIONS])
    out = tmp_path / "mc.json"
    assert main(["eval", str(model_dir), "--adapter", str(adapter), "--task", "multiple-choice",
                 "--data", str(data), "--out", str(out), "--log-samples", "--quiet"]) == 0
    saved = json.loads(out.read_text())["results"]["multiple-choice"]
    expected = evaluate_choice(adapted, tokenizer, choice_examples())
    np.testing.assert_allclose([s["logliks"] for s in saved["samples"]],
                               [s["logliks"] for s in expected.samples], atol=1e-4)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("lines, message", [
    (['{"context": "a", "choices": ["x", "y"], "answer": 0}', '{"context": "b", "choices"'],
     r"bad\.jsonl:2: not valid JSON"),
    (['{"context": "a", "choices": ["x", "y"], "answer": 0}', "", '{"choices": ["x"], "answer": 0}'],
     r"bad\.jsonl:3: no 'context' field \(the line has choices, answer\)"),
    (['{"context": "a", "choices": ["x", "y"], "answer": 2}'],
     r"bad\.jsonl:1: answer 2 is out of range for 2 choices \(0\.\.1\)"),
    (['{"context": "a", "choices": ["x", "y"], "answer": "z"}'],
     r"bad\.jsonl:1: the answer 'z' is not one of the choices"),
    (['{"context": "a", "choices": [], "answer": 0}'], r"bad\.jsonl:1: 'choices' must be a non-empty"),
    (['{"context": "a", "choices": ["x"], "answer": true}'], r"bad\.jsonl:1: 'answer' must be"),
    (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
    (["", "  "], r"bad\.jsonl has no examples"),
])
def test_bad_multiple_choice_files_name_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalDataError, match=message):
        read_choice_examples(path)


def test_bad_generation_and_text_files_and_the_cli_message(tmp_path, model_dir, capsys):
    path = tmp_path / "gen.jsonl"
    path.write_text('{"prompt": "a", "answer": 3}\n{"prompt": "b"}\n')
    with pytest.raises(EvalDataError, match=r"gen\.jsonl:2: no 'answer' field.*--answer-field"):
        read_generation_examples(path)
    assert read_generation_examples(path, limit=1)[0].answer == "3"  # numbers compare as text
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EvalDataError, match=r"empty\.txt is empty"):
        read_text(empty)
    # The command reports the line in one message, exit status 2, before loading the model.
    assert main(["eval", str(model_dir), "--task", "generation", "--data", str(path)]) == 2
    assert "gen.jsonl:2: no 'answer' field" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--data", str(path)]) == 2
    assert "--task" in capsys.readouterr().err
