"""lm-evaluation-harness scores a multiple-choice task through `lmforge serve` exactly as a
direct log-likelihood computation with the model does."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.modeldir import save_model
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import train_bpe

from .test_serve import NAME, running

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("The king of Denmark's son is named", ["Hamlet", "Romeo", "Lear", "Othello"], 0),
    ("Wherefore art thou", ["Romeo", "Hamlet", "Macbeth", "Puck"], 0),
    ("To be, or not to", ["be", "see", "go", "sing"], 0),
    ("Now is the winter of our", ["discontent", "summer", "kingdom", "castle"], 0),
    ("A horse! a horse! my kingdom for a", ["horse", "crown", "sword", "cat"], 0),
    ("The lady doth protest too", ["much", "little", "often", "loud"], 0),
    ("All the world's a", ["stage", "house", "sea", "song"], 0),
    ("Friends, Romans,", ["countrymen", "soldiers", "kings", "brothers"], 0),
]

TASK = """task: lmforge_mc
output_type: multiple_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shakespeare):
    tokenizer = train_bpe([shakespeare], vocab_size=600)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=48,
                                vocab_size=tokenizer.vocab_size, context_length=128,
                                positions="rope", norm="rmsnorm", mlp="swiglu")).eval()
    directory = tmp_path_factory.mktemp("mc-model")
    save_model(directory, model, tokenizer)
    return directory, model, tokenizer


def direct_scores(model, tokenizer) -> list[list[float]]:
    """Each choice's summed continuation log-likelihood, tokenized as lm-eval does: the
    continuation's tokens are those the whole text has past the context's."""
    scores = []
    for question, choices, _ in QUESTIONS:
        context = tokenizer.encode(question)
        row = []
        for choice in choices:
            whole = tokenizer.encode(question + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole]))[0], dim=-1)
            positions = torch.arange(len(context) - 1, len(whole) - 1)
            row.append(logp[positions, torch.tensor(whole[len(context):])].sum().item())
        scores.append(row)
    return scores


def test_lm_eval_through_the_server_matches_direct_log_likelihoods(model_dir, tmp_path):
    if shutil.which("lm_eval") is None and not _importable("lm_eval"):
        pytest.skip("lm-eval is not installed (pip install 'lm-eval[hf,api]')")
    directory, model, tokenizer = model_dir
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "lmforge_mc.yaml").write_text(TASK.format(data=data))
    out = tmp_path / "results"
    with running(model, tokenizer, max_batch=4) as url:
        args = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
                "--model_args", f"model={NAME},base_url={url}/v1/completions,"
                f"tokenizer_backend=huggingface,tokenizer={directory},tokenized_requests=True,"
                "max_length=128,num_concurrent=1",
                "--tasks", "lmforge_mc", "--include_path", str(tasks),
                "--output_path", str(out), "--log_samples"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
        run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples_file = next(out.rglob("samples_lmforge_mc_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    served = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
    expected = direct_scores(model, tokenizer)
    assert torch.allclose(torch.tensor(served), torch.tensor(expected), atol=1e-3)
    picks = [max(range(len(row)), key=row.__getitem__) for row in expected]
    assert picks == [max(range(len(row)), key=row.__getitem__) for row in served]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    accuracy = results["results"]["lmforge_mc"]["acc,none"]
    assert accuracy == pytest.approx(sum(p == a for p, (_, _, a) in zip(picks, QUESTIONS))
                                     / len(QUESTIONS))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
