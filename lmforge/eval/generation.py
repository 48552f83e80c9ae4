"""Generation tasks: greedy answers to prompts, scored by exact match or by a regex.

Prompts decode together through the inference engine (continuous batching), so a data set
runs at serving speed. A prompt too long for the context keeps its end, leaving room for
`max_new_tokens` (lm-evaluation-harness truncates the same way). With `chat` the prompt is
the user's message, rendered with the model's chat template. An example may carry images
(paths, for a vision-language model: VQA-style exact match); they come before its prompt.

Scoring: the output, stripped of surrounding whitespace, must equal the answer, also
stripped (optionally ignoring case). With a regex, the part of the output compared is the
regex's first match, its first group if it has one (`The answer is (\\d+)`): the first
match, because an answer usually comes before whatever a model adds after it. An output
with no match is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lmforge.chat import chat_prompt_ids, prompt_with_images
from lmforge.errors import ConfigError
from lmforge.eval.data import EvalDataError, GenerationExample
from lmforge.eval.loglik import encode_text
from lmforge.eval.results import EvalResult
from lmforge.images import ImageProcessor, image_processor
from lmforge.infer.engine import Engine, Request, prompt_ids
from lmforge.infer.sampling import SamplingConfig
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer

GREEDY = SamplingConfig(temperature=0)


def prompt_tokens(tokenizer: Tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """The prompt's ids: as a user message in the chat template, or the text itself (with
    BOS when the tokenizer asks for one; an empty prompt starts from BOS)."""
    if chat:
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    return encode_text(tokenizer, prompt) or prompt_ids(tokenizer, "")


def generate_texts(model: Decoder, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                   max_new_tokens: int, stop: Sequence[str] = (), stop_ids: Sequence[int] = (),
                   sampling: SamplingConfig = GREEDY, seed: int = 0, batch_size: int = 8,
                   progress: bool = False,
                   images: Sequence[tuple[torch.Tensor, ...]] | None = None) -> list[str]:
    """The text generated after each prompt, decoded `batch_size` at a time; stop strings
    end a text (not included), as do stop tokens. `images`: each prompt's pixels, for a
    vision-language model."""
    images = images or [()] * len(prompts)
    context = model.cfg.context_length
    if not 0 < max_new_tokens < context:
        raise ConfigError(f"max_new_tokens must be between 1 and {context - 1} (the model's "
                          f"context is {context}), got {max_new_tokens}")
    # A cache as long as the longest example needs, not the model's whole context (SmolLM2's
    # 8192 positions x 8 slots would be 3 GB to clear and to attend over).
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    engine = Engine(model, tokenizer, max_batch=batch_size, max_len=min(longest, context))
    ids = [engine.submit(Request(list(p[-(context - max_new_tokens):]), max_new_tokens,
                                 sampling, seed, stop=tuple(stop), stop_ids=tuple(stop_ids),
                                 images=pixels))
           for p, pixels in zip(prompts, images)]
    bar = tqdm(total=len(ids), desc="generating", unit="prompt", disable=not progress)
    texts: dict[int, str] = {}
    while engine.has_work():
        done = {e.request_id: e.completion.text for e in engine.step() if e.completion}
        texts.update(done)
        bar.update(len(done))
    bar.close()
    return [texts[i] for i in ids]


def compile_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"--regex {pattern!r} is not a valid regular expression: {err}") from err


def extract_answer(text: str, regex: re.Pattern | None = None) -> str | None:
    """The part of an output that is compared with the answer: all of it without a regex,
    else its first match's first group (the whole match for a regex without groups);
    None when the regex does not match."""
    if regex is None:
        return text
    match = regex.search(text)
    if match is None:
        return None
    return match.group(1) if regex.groups else match.group(0)


def is_match(prediction: str | None, answer: str, ignore_case: bool = False) -> bool:
    """Exact match after stripping whitespace at both ends."""
    if prediction is None:
        return False
    prediction, answer = prediction.strip(), answer.strip()
    if ignore_case:
        prediction, answer = prediction.casefold(), answer.casefold()
    return prediction == answer


def evaluate_generation(model: Decoder, tokenizer: Tokenizer, examples: list[GenerationExample],
                        max_new_tokens: int = 64, stop: Sequence[str] = (),
                        stop_ids: Sequence[int] = (), chat: bool = False,
                        regex: str | None = None, ignore_case: bool = False,
                        batch_size: int = 8, progress: bool = False,
                        processor: ImageProcessor | None = None) -> EvalResult:
    """exact_match of greedy outputs (see the module docstring). `processor`: how a
    vision-language model sees the examples' images (`OpenedModel.processor`; None: lmforge's
    own square view for one of lmforge's models)."""
    if not examples:
        raise EvalDataError("there are no generation examples to score")
    pattern = compile_regex(regex) if regex is not None else None
    processor = processor or image_processor(model.cfg, tokenizer)
    prompts, images = zip(*(prompt_with_images(processor, tokenizer, ex.prompt, ex.images, chat)
                            if ex.images else (prompt_tokens(tokenizer, ex.prompt, chat), ())
                            for ex in examples))
    outputs = generate_texts(model, tokenizer, prompts, max_new_tokens, stop, stop_ids,
                             batch_size=batch_size, progress=progress, images=images)
    samples = []
    for ex, output in zip(examples, outputs):
        prediction = extract_answer(output, pattern)
        samples.append({"line": ex.line, "prompt": ex.prompt, "answer": ex.answer,
                        "output": output, "prediction": prediction,
                        "exact_match": float(is_match(prediction, ex.answer, ignore_case))})
    n = len(samples)
    return EvalResult("generation", {"exact_match": sum(s["exact_match"] for s in samples) / n},
                      n, details={"regex": regex, "ignore_case": ignore_case, "chat": chat,
                                  "max_new_tokens": max_new_tokens, "stop": list(stop)},
                      samples=samples)
