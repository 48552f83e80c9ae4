"""Text embeddings from a language model's hidden states.

A text's embedding is the mean, over its tokens, of the model's final normed hidden states
(what the output projection reads), scaled to unit length: cosine similarity is then a dot
product. Mean pooling is the choice that needs no training: a causal model's last token
alone sees the whole text but is trained to predict the next token, not to sum up. Texts
are cut to the model's context; a vision-language model embeds text through its decoder.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lmforge.models import Decoder, LanguageModel
from lmforge.models.vlm import VLM
from lmforge.tokenizer import Tokenizer


class NoEmbeddings(ValueError):
    """The model has no decoder whose hidden states embed a text."""


def text_decoder(model: LanguageModel) -> Decoder:
    if isinstance(model, VLM):
        return model.text
    if isinstance(model, Decoder):
        return model
    raise NoEmbeddings(f"a {type(model).__name__} gives no text embeddings here: serve a "
                       "decoder-only or vision-language model for them")


@torch.inference_mode()
def embed(model: LanguageModel, token_lists: list[list[int]], batch_size: int = 16
          ) -> torch.Tensor:
    """Unit-length embeddings (N, d_model), float32, of token lists (each cut to the
    model's context length; an empty one is an error)."""
    decoder = text_decoder(model)
    device = decoder.final_norm.weight.device
    limit = decoder.cfg.context_length
    if any(not ids for ids in token_lists):
        raise ValueError("an input has no tokens: give non-empty texts")
    out = []
    # Similar lengths together waste the least on padding.
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for first in range(0, len(order), batch_size):
        chosen = [token_lists[i][:limit] for i in order[first:first + batch_size]]
        longest = max(map(len, chosen))
        ids = torch.zeros(len(chosen), longest, dtype=torch.long)
        mask = torch.zeros(len(chosen), longest, 1)
        for row, tokens in enumerate(chosen):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
        # Padding goes at the end, where a causal model's real tokens never see it.
        states = decoder.features(ids.to(device)).float() * mask.to(device)
        out.append(F.normalize(states.sum(1) / mask.sum(1).to(device), dim=-1).cpu())
    result = torch.cat(out)
    return result[torch.argsort(torch.tensor(order))]


def embed_texts(model: LanguageModel, tokenizer: Tokenizer, texts: list[str],
                batch_size: int = 16) -> torch.Tensor:
    return embed(model, [tokenizer.encode(t) for t in texts], batch_size)
