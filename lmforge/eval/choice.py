"""Multiple choice by log-likelihood, scored as lm-evaluation-harness scores it.

Each choice is scored as the continuation `delimiter + choice` of the context (the harness's
`target_delimiter`, a space by default), tokenized by `encode_pair`. The metrics are the
harness's for `output_type: multiple_choice` (lm_eval/api/task.py, `process_results`):

- acc: the choice with the highest summed log-likelihood is the answer;
- acc_norm: the highest log-likelihood per character of the choice (without the delimiter),
  which stops long answers losing just for being long;
- acc_bytes: the same per UTF-8 byte of the choice.

Ties go to the first choice, as numpy's argmax breaks them.
"""

from __future__ import annotations

from lmforge.eval.data import ChoiceExample, EvalDataError
from lmforge.eval.loglik import encode_pair, score_continuations
from lmforge.eval.results import EvalResult
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer


def choice_logliks(model: Decoder, tokenizer: Tokenizer, examples: list[ChoiceExample],
                   delimiter: str = " ", batch_size: int = 8, progress: bool = False
                   ) -> list[list[float]]:
    """Summed log P(delimiter + choice | context) of every choice of every example."""
    pairs = [encode_pair(tokenizer, ex.context, delimiter + choice)
             for ex in examples for choice in ex.choices]
    scores = iter(score_continuations(model, pairs, batch_size, progress))
    return [[next(scores)[0] for _ in ex.choices] for ex in examples]


def argmax(values: list[float]) -> int:
    """Index of the largest value, the first one on a tie."""
    return max(range(len(values)), key=values.__getitem__)


def normalized(logliks: list[float], lengths: list[int]) -> list[float]:
    """Log-likelihood per unit of length; an empty choice can never win (-inf), as numpy's
    division of a negative number by zero makes it in the harness."""
    return [ll / n if n else float("-inf") for ll, n in zip(logliks, lengths)]


def evaluate_choice(model: Decoder, tokenizer: Tokenizer, examples: list[ChoiceExample],
                    delimiter: str = " ", batch_size: int = 8, progress: bool = False
                    ) -> EvalResult:
    """acc, acc_norm and acc_bytes of `examples` (see the module docstring)."""
    if not examples:
        raise EvalDataError("there are no multiple-choice examples to score")
    logliks = choice_logliks(model, tokenizer, examples, delimiter, batch_size, progress)
    samples = []
    for ex, lls in zip(examples, logliks):
        pred = argmax(lls)
        pred_norm = argmax(normalized(lls, [len(c) for c in ex.choices]))
        pred_bytes = argmax(normalized(lls, [len(c.encode("utf-8")) for c in ex.choices]))
        samples.append({"line": ex.line, "context": ex.context, "choices": ex.choices,
                        "answer": ex.answer, "logliks": lls, "pred": pred,
                        "pred_norm": pred_norm, "acc": float(pred == ex.answer),
                        "acc_norm": float(pred_norm == ex.answer),
                        "acc_bytes": float(pred_bytes == ex.answer)})
    n = len(samples)
    metrics = {name: sum(s[name] for s in samples) / n for name in ("acc", "acc_norm", "acc_bytes")}
    return EvalResult("multiple-choice", metrics, n, details={"delimiter": delimiter},
                      samples=samples)
