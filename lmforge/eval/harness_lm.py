"""The `lmforge` model type of lm-evaluation-harness: lmforge models inside the harness.

Importing this module registers the type (lm_eval must be installed); `lmforge.eval.harness`
does so before it runs the harness, see there for the commands. Scoring is lmforge's own
(`score_continuations`, the harness's tokenization rules through `TemplateLM`), generation
runs through lmforge's inference engine.

model_args: pretrained (required: any model lmforge can load, as for `lmforge generate`),
adapter (a fine-tuned adapter directory), device, dtype (fp32 | bf16 | fp16),
batch_size (sequences per forward pass; "auto" means 8), max_gen_toks (default 256).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lmforge.chat import CHATML_TEMPLATE, render_chat
from lmforge.errors import ConfigError, LmforgeError
from lmforge.eval.generation import generate_texts
from lmforge.eval.loglik import ScoringError, encode_text, prefix_token, score_continuations
from lmforge.infer.sampling import SamplingConfig
from lmforge.open import open_model


class HarnessMissing(LmforgeError, ImportError):
    """lm-evaluation-harness, an optional dependency, is not installed."""


try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import (
        get_rolling_token_windows,
        make_disjoint_window,
        simple_parse_args_string,
    )
except ImportError as err:
    raise HarnessMissing("lm-evaluation-harness is not installed: pip install lm-eval") from err

@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge model and tokenizer as an lm-evaluation-harness language model.

    Give `pretrained` (a name or path, loaded like every lmforge command loads it), or a
    loaded `model` and `tokenizer` (with their `stop_ids`) when calling the harness from
    Python. max_batch_size is accepted because the harness always passes it; batches are
    never sized automatically."""

    def __init__(self, pretrained: str | None = None, adapter: str | Literal[False] | None = None,
                 device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = 8, max_gen_toks: int = 256, model=None,
                 tokenizer=None, stop_ids: tuple[int, ...] = (),
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown model_args for lmforge: {', '.join(unknown)}; it takes "
                              "pretrained, adapter, device, dtype, batch_size and max_gen_toks")
        if model is None:
            if pretrained is None:
                raise ConfigError("the lmforge model type needs a model: --model_args "
                                  "pretrained=MODEL (a directory, .gguf file or registry name)")
            model, tokenizer, stop_ids = _load(pretrained, adapter, device, dtype)
        if tokenizer is None:
            raise ConfigError(f"{pretrained or 'the model'} has no tokenizer.json to encode "
                              "text with")
        self.model, self.tokenizer, self.stop_ids = model.eval(), tokenizer, tuple(stop_ids)
        self._device = model.final_norm.weight.device
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.name = str(pretrained or "lmforge")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> LmforgeLM:
        # The harness's CLI always passes its own batch_size (1) and device (cuda:0) beside
        # model_args; a setting given in model_args wins instead of colliding with them.
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict[str, Any] | None = None) -> LmforgeLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int | None:
        return prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self.model.cfg.context_length

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        return encode_text(self.tokenizer, string, add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = score_continuations(self.model, pairs, self.batch_size,
                                      progress=not disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in the harness's disjoint rolling windows."""
        prefix = self.prefix_token_id
        if prefix is None:
            raise ScoringError("rolling log-likelihoods start from a BOS or EOS token, and "
                               "this tokenizer has neither")
        pairs, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), prefix,
                                                    self.max_length, context_len=1):
                pairs.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        scores = score_continuations(self.model, pairs, self.batch_size,
                                     progress=not disable_tqdm)
        for index, (loglik, _) in zip(owners, scores):
            totals[index] += loglik
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Texts generated after each context, ended by the request's `until` strings."""
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        groups: dict[tuple, list[int]] = {}
        settings = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = tuple(handle_stop_sequences(kwargs.pop("until", None), eos=eos))
            sampling = SamplingConfig(temperature=float(kwargs.get("temperature") or 0.0),
                                      top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"))
            key = (int(kwargs["max_gen_toks"]), until, repr(sampling))
            groups.setdefault(key, []).append(index)
            settings.append((context, sampling))
        outputs: list[str] = [""] * len(requests)
        # Requests with the same settings decode together (the harness groups them alike).
        for (max_gen_toks, until, _), indices in groups.items():
            prompts = [self.tok_encode(settings[i][0]) for i in indices]
            texts = generate_texts(self.model, self.tokenizer, prompts, max_gen_toks,
                                   until, self.stop_ids, settings[indices[0]][1],
                                   batch_size=self.batch_size, progress=not disable_tqdm)
            for i, text in zip(indices, texts):
                outputs[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat_history, add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return self.tokenizer.chat_template or CHATML_TEMPLATE


def _load(spec: str, adapter: str | Literal[False] | None, device: str | None, dtype: str | None):
    """Model, tokenizer and stop tokens, opened the way the lmforge commands open them."""
    # The harness asks for cuda:0 unless told otherwise; without a GPU that means the CPU,
    # as for its own hf model type.
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    opened = open_model(spec, device, dtype, adapter)
    return opened.model, opened.tokenizer, opened.stop_ids


def _batch_size(value: int | str | None) -> int:
    """The harness passes "auto", "auto:N" or a number, as text or as an int."""
    if value is None or str(value).startswith("auto"):
        return 8
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"batch_size={value} is not a whole number") from None
    if size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {size}")
    return size
