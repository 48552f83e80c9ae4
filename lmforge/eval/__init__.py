"""The evaluation suite: how well a model predicts text, picks answers and writes them.

- `perplexity`: perplexity and bits per byte of a text, in windows (`evaluate_perplexity`).
- `choice`: multiple choice by log-likelihood, scored exactly as lm-evaluation-harness scores
  it (`evaluate_choice`), on the tokenization rules of `loglik`.
- `generation`: greedy answers through the inference engine, exact match or regex
  (`evaluate_generation`).
- `data`: JSONL and text readers whose errors name the file and line.
- `results`: the `EvalResult` every task returns, its table and JSON file.
- `harness`, `harness_lm`: lm-evaluation-harness tasks on lmforge models (the `lmforge`
  model type); lm_eval is imported only there.

`lmforge eval` (lmforge/cli.py) is the command line over all of them.
"""

from lmforge.eval.choice import evaluate_choice
from lmforge.eval.data import (
                               ChoiceExample,
                               EvalDataError,
                               GenerationExample,
                               read_choice_examples,
                               read_generation_examples,
                               read_text,
)
from lmforge.eval.generation import evaluate_generation
from lmforge.eval.loglik import encode_pair, score_continuations
from lmforge.eval.perplexity import evaluate_perplexity, perplexity, token_nll
from lmforge.eval.results import EvalResult, format_table, write_results

__all__ = ["ChoiceExample", "EvalDataError", "EvalResult", "GenerationExample", "encode_pair",
           "evaluate_choice", "evaluate_generation", "evaluate_perplexity", "format_table",
           "perplexity", "read_choice_examples", "read_generation_examples", "read_text",
           "score_continuations", "token_nll", "write_results"]
