"""Log-likelihoods of continuations, tokenized and scored the way lm-evaluation-harness does.

The harness (lm_eval/api/model.py, `TemplateLM`) turns a (context, continuation) pair into
tokens by moving the context's trailing whitespace onto the continuation, encoding the
context and context + continuation as whole strings, and taking the continuation's tokens
to be those the whole has past the context's length. An empty context is replaced by a
prefix token (BOS, else EOS). `encode_pair` repeats those rules exactly, so lmforge's own
multiple-choice scores and the `lmforge` model type inside the harness agree to the last
digit; both then score through `score_continuations`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lmforge.errors import LmforgeError
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer


class ScoringError(LmforgeError, ValueError):
    """A continuation that cannot be scored (empty, longer than the context, no prefix token)."""


def encode_text(tokenizer: Tokenizer, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text` as the harness's `tok_encode` gives them: with the BOS token first
    when the tokenizer asks for one (`add_bos_token`) and the text does not start with it.
    add_bos=False never adds it, True always does."""
    if add_bos is None:
        return tokenizer.encode_prompt(text)
    ids, bos = tokenizer.encode(text), tokenizer.bos_id
    return [bos, *ids] if add_bos and bos is not None else ids


def prefix_token(tokenizer: Tokenizer) -> int | None:
    """The token that stands in for an empty context: BOS, else EOS (as the harness's
    `prefix_token_id`); None for tokenizers with neither (char)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-evaluation-harness's
    `TemplateLM.loglikelihood` makes them for a causal model."""
    if not context:
        continuation_ids = encode_text(tokenizer, continuation, add_bos=False)
        prefix = prefix_token(tokenizer)
        if prefix is None:
            raise ScoringError("an empty context needs a BOS or EOS token to condition on, "
                               "and this tokenizer has neither: give every example a context")
        if continuation_ids[:1] == [prefix]:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    # Word-initial spaces belong to the next word in BPE vocabularies ("Ġword"), so the
    # space ending a context is scored as part of the continuation.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_text(tokenizer, context + continuation)
    context_ids = encode_text(tokenizer, context)
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def score_continuations(model: Decoder, pairs: Sequence[tuple[list[int], list[int]]],
                        batch_size: int = 8, progress: bool = False
                        ) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the
    continuation given the context, and whether greedy decoding would produce it.

    Sequences run `batch_size` at a time, longest first, right-padded (a causal model's
    positions never see the padding after them). One longer than the model's context keeps
    its last context_length + 1 tokens, as the harness truncates.
    """
    limit = model.cfg.context_length
    for context, continuation in pairs:
        if not context or not continuation:
            raise ScoringError("every pair needs at least one context and one continuation "
                               f"token, got {len(context)} and {len(continuation)}")
        if len(continuation) > limit:
            raise ScoringError(f"a continuation of {len(continuation)} tokens does not fit in "
                               f"the model's context of {limit} tokens")
    device = model.final_norm.weight.device
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    bar = tqdm(total=len(pairs), desc="scoring", unit="seq", disable=not progress)
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        inputs = [(pairs[i][0] + pairs[i][1])[-(limit + 1):][:-1] for i in batch]
        width = max(map(len, inputs))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(inputs):
            ids[row, :len(seq)] = torch.tensor(seq)
        logits = model(ids.to(device))
        for row, i in enumerate(batch):
            continuation = torch.tensor(pairs[i][1], device=device)
            end = len(inputs[row])
            logp = torch.log_softmax(logits[row, end - len(continuation):end].float(), dim=-1)
            chosen = logp.gather(1, continuation[:, None])
            greedy = bool((logp.argmax(dim=-1) == continuation).all())
            results[i] = (chosen.double().sum().item(), greedy)
        bar.update(len(batch))
    bar.close()
    return results
