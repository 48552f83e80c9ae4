"""Calibration data: what the compression methods that look at activations (GPTQ, AWQ,
Wanda, SparseGPT) run through the model to learn which weights matter.

`calibration_tokens` draws N windows of L tokens, seeded, from a text file, a JSONL file
(its `text` field) or a corpus prepared by `lmforge prepare` (its train split).
`through_blocks` runs them through a decoder one block at a time, so that only one block's
inputs are ever held (N x L x d_model floats) and a method can change a block before the
next one sees its outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.data.loader import TokenShards
from lmforge.errors import LmforgeError
from lmforge.eval.data import read_jsonl, read_text
from lmforge.models.decoder import Decoder
from lmforge.tokenizer import Tokenizer


class CalibrationError(LmforgeError, ValueError):
    """Calibration data that cannot give the windows asked for."""


def calibration_ids(source: str | Path, tokenizer: Tokenizer, text_field: str = "text"
                    ) -> np.ndarray:
    """Every token of `source`: a prepared corpus (a folder with meta.json), a JSONL file
    (the `text_field` of each line, joined by blank lines) or a UTF-8 text file."""
    path = Path(source)
    if path.is_dir():
        shards = TokenShards(path)
        if shards.vocab_size > tokenizer.vocab_size:
            raise CalibrationError(f"{path} was prepared with a vocabulary of "
                                   f"{shards.vocab_size} tokens, larger than the model's "
                                   f"{tokenizer.vocab_size}: prepare it with the model's "
                                   "tokenizer (lmforge prepare --tokenizer MODEL)")
        return shards.split("train")  # memory-mapped: only the windows drawn are read
    if path.suffix == ".jsonl":
        texts = []
        for number, record in read_jsonl(path):
            if not isinstance(record.get(text_field), str):
                raise CalibrationError(f"{path}:{number}: no {text_field!r} text field")
            texts.append(record[text_field])
        text = "\n\n".join(texts)
    else:
        text = read_text(path)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def calibration_tokens(source: str | Path, tokenizer: Tokenizer, n: int = 128,
                       length: int = 512, seed: int = 0, text_field: str = "text"
                       ) -> torch.Tensor:
    """`n` windows (n, length) of the tokens of `source` (see `calibration_ids`), each
    starting at a seeded random place."""
    ids = calibration_ids(source, tokenizer, text_field)
    if len(ids) < length:
        raise CalibrationError(f"{source} has {len(ids):,} tokens, fewer than one window of "
                               f"{length}: give more text or a shorter --calib-length")
    starts = np.random.default_rng(seed).integers(0, len(ids) - length + 1, size=n)
    return torch.from_numpy(np.stack([ids[s:s + length] for s in starts]).astype(np.int64))


@dataclass(frozen=True)
class Calibration:
    """Where calibration windows come from and how many: see `calibration_tokens`."""

    source: str | Path
    n: int = 128
    length: int = 512
    seed: int = 0

    def tokens(self, tokenizer: Tokenizer) -> torch.Tensor:
        return calibration_tokens(self.source, tokenizer, self.n, self.length, self.seed)


BlockStep = Callable[[int, nn.Module, Callable[[], None]], None]


def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies it natively (CUDA, CPUs with AVX512-BF16 or
    AMX: 2.6x float32's speed on a Zen 4 core), else float32, which is faster elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    capabilities = torch.cpu.get_capabilities()
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    return torch.bfloat16 if device.type == "cpu" and native else torch.float32


@torch.no_grad()
def through_blocks(model: Decoder, tokens: torch.Tensor, before_block: BlockStep,
                   batch_size: int = 16, progress: bool = True, desc: str = "blocks",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run `tokens` (N, L) through `model` a block at a time: `before_block(i, block, run)`
    may put hooks on block i (and change it) before every sequence goes through it, in
    batches of `batch_size`; `run()` sends them through block i as it is, for a method to
    look at its inputs first. Returns the final normed hidden states (N, L, d_model), what
    the output projection reads, after every block has been through `before_block`.

    `dtype` bfloat16 runs the blocks' matrix products in it (autocast; the residual stream
    stays float32), and `on_linear_inputs` hooks still compute in float32."""
    pieces = [model.block_inputs(chunk) for chunk in tokens.split(batch_size)]
    xs = [x for x, _ in pieces]
    device = tokens.device.type

    def through(i: int, block: nn.Module) -> list[torch.Tensor]:
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return [block(x, *layers[i], None) for x, (_, layers) in zip(xs, pieces)]

    for i, block in enumerate(tqdm(model.blocks, desc=desc, unit="block", disable=not progress)):
        before_block(i, block, lambda i=i, block=block: through(i, block))
        xs = through(i, block)
    return torch.cat([model.final_norm(x) for x in xs])


def on_linear_inputs(module: nn.Module, prefix: str,
                     act: Callable[[str, nn.Linear, torch.Tensor], None]) -> list:
    """Call `act(name, linear, x)` as each Linear layer of `module` is reached, before it
    runs on its input x (its name is `prefix.` and its name in `module`), outside any
    autocast (see `through_blocks`); the hooks' handles."""
    def hook(layer: nn.Linear, args: tuple, name: str) -> None:
        with torch.autocast(args[0].device.type, enabled=False):
            act(name, layer, args[0])

    return [linear.register_forward_pre_hook(
                lambda layer, args, name=f"{prefix}.{name}": hook(layer, args, name))
            for name, linear in module.named_modules() if isinstance(linear, nn.Linear)]
