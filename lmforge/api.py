"""lmforge from Python: what the commands do, as functions (`import lmforge` exposes these).

    import lmforge

    result = lmforge.Trainer(lmforge.load_recipe("configs/tiny.yaml", ["max_steps=100"])).fit()
    opened = lmforge.open_model(result.run_dir)
    print(lmforge.generate_text(opened, "ROMEO:", max_new_tokens=50, seed=0))

Importing this module registers every training task (lm, seq2seq, sft, classify, vlm,
distill) and every model-directory hook (quantized weights, classification heads), so any
recipe trains and any model directory opens.
"""

from __future__ import annotations

from lmforge.compress.distill import DistillTask  # noqa: F401  (registers task=distill)
from lmforge.finetune.classify import Classifier, load_classifier, predict
from lmforge.finetune.run import finetune_recipe, merge
from lmforge.finetune.sft import ChatTask  # noqa: F401  (registers task=sft)
from lmforge.finetune.vlm import VisionChatTask  # noqa: F401  (registers task=vlm)
from lmforge.infer.engine import Engine, Request, prompt_ids, stream_one
from lmforge.infer.sampling import SamplingConfig
from lmforge.infer.seq2seq import translate
from lmforge.open import OpenedModel, open_model
from lmforge.train.config import TrainConfig, load_recipe
from lmforge.train.sharded import consolidate
from lmforge.train.trainer import Trainer, TrainResult


def generate_text(opened: OpenedModel, prompt: str, max_new_tokens: int = 256,
                  sampling: SamplingConfig | None = None, seed: int | None = None,
                  stop: tuple[str, ...] = ()) -> str:
    """The text a model writes after `prompt` (stopping at its stop tokens or strings)."""
    request = Request(prompt_ids(opened.tokenizer, prompt), max_new_tokens,
                      sampling or SamplingConfig(), seed, stop=tuple(stop),
                      stop_ids=opened.stop_ids)
    return "".join(event.text for event in stream_one(opened.model, opened.tokenizer, request))


__all__ = ["Classifier", "Engine", "OpenedModel", "Request", "SamplingConfig", "TrainConfig",
           "TrainResult", "Trainer", "consolidate", "finetune_recipe", "generate_text", "load_classifier",
           "load_recipe", "merge", "open_model", "predict", "translate"]
