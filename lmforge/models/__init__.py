"""Model families and what every family offers the rest of lmforge.

A family is a config dataclass and an `nn.Module` built from it: `Decoder` (GPT-2 and Llama
shapes, `decoder.py`), `Seq2Seq` (the encoder-decoder Transformer, `seq2seq.py`) and `VLM` (a
vision encoder and projector in front of the decoder, `vlm.py`). All implement
`LanguageModel`, the protocol the inference engine, the model directory and
`lmforge info` are written against.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lmforge.config import FlopsReport, ModelConfig, Seq2SeqConfig, VLMConfig
from lmforge.layers import KVCache
from lmforge.models.decoder import Decoder
from lmforge.models.seq2seq import Seq2Seq
from lmforge.models.vlm import VLM


@runtime_checkable
class LanguageModel(Protocol):
    """What a model family provides: the engine decodes any of them through these alone.

    cfg: its config dataclass, with at least `context_length` (the longest sequence the
    cache holds), `vocab_size` and `tie_embeddings`.
    new_cache(batch, length): an empty cache for `batch` sequences of up to `length` positions
    (`length` defaults to the context). A family keeps in it whatever its decoding reads (a
    seq2seq model also keeps each row's encoded source). A family whose attention reads
    paged caches also has new_paged_cache(slots, length, block, blocks), which the engine
    then uses (`lmforge.layers.PagedKVCache`: the decoder-only and vision-language ones).
    forward(tokens, cache, start, last_only): logits (B, T, vocab) of tokens (B, T) at
    positions start.. (an int, or a (B,) tensor of each row's own), reading and writing
    earlier positions in `cache`; with last_only, only the last position's.
    flops(): parameter counts and training FLOPs per token.
    """

    cfg: ModelConfig | Seq2SeqConfig

    def new_cache(self, batch: int, length: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache: ...

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                start: int | torch.Tensor = 0, last_only: bool = False) -> torch.Tensor: ...

    def flops(self) -> FlopsReport: ...

    def tie_weights(self) -> None: ...

    def reset_buffers(self) -> None: ...


FAMILIES: dict[type, type] = {ModelConfig: Decoder, Seq2SeqConfig: Seq2Seq, VLMConfig: VLM}


def build_model(cfg: ModelConfig | Seq2SeqConfig | VLMConfig) -> LanguageModel:
    """A freshly initialised model of the family `cfg` belongs to."""
    return FAMILIES[type(cfg)](cfg)


__all__ = ["VLM", "Decoder", "LanguageModel", "Seq2Seq", "build_model"]
