"""The sequence-to-sequence task: an encoder-decoder model learning to map a source text to
its target (translation), from a parallel corpus.

Pairs are split (seeded) into train / validation / test; a joint byte-level BPE is trained on
both sides of the training pairs (or `tokenizer=PATH` reuses one). Batches group pairs of
similar length, so little of each batch is padding; the loss is cross-entropy on the target
tokens with optional label smoothing. Validation reports loss (without smoothing) and
greedy-decoding BLEU (from step 1: an untrained model's BLEU is ~0 and slow to decode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import Seq2SeqConfig, resolve_seq2seq_config
from lmforge.data.loader import in_order
from lmforge.data.parallel import read_pairs, split_pairs
from lmforge.errors import CheckpointMismatch
from lmforge.infer.seq2seq import framing, translate
from lmforge.modeldir import WEIGHTS, load_weights, read_config, save_model
from lmforge.models.seq2seq import Seq2Seq, pad_sources
from lmforge.tokenizer import Tokenizer, train_bpe
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import Dist
from lmforge.train.task import register_task

IGNORE = -100
# Pairs sorted by length within pools of this many batches: similar lengths, still shuffled.
POOL_BATCHES = 50


def length_batches(lengths: list[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of pair indices) of one epoch: a seeded shuffle, pools sorted by
    length and cut into batches, the batches shuffled again."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    batches = []
    for start in range(0, len(order), batch * POOL_BATCHES):
        pool = sorted(order[start:start + batch * POOL_BATCHES], key=lambda i: lengths[i])
        batches += [pool[i:i + batch] for i in range(0, len(pool), batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


class Seq2SeqTask:
    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        self.cfg, self.dist = cfg, dist
        pairs, self.skipped = read_pairs(cfg.data, cfg.source_field, cfg.target_field,
                                         cfg.bad_lines)
        for message in self.skipped[:5]:
            print(f"skipped {message}")
        if len(self.skipped) > 5:
            print(f"... skipped {len(self.skipped)} lines in all")
        self.train_pairs, self.val_pairs, self.test_pairs = split_pairs(
            pairs, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        if cfg.tokenizer not in ("bpe", ""):
            self.tokenizer = Tokenizer.load(cfg.tokenizer)
        else:
            texts = [side for pair in self.train_pairs for side in pair]
            self.tokenizer = train_bpe(texts, vocab_size=cfg.vocab_size)
        self.bos, self.eos, self.pad = framing(self.tokenizer)
        self.model_cfg = resolve_seq2seq_config(cfg.seq2seq_model())
        self.model_cfg.vocab_size = self.tokenizer.vocab_size
        self.context = self.model_cfg.max_length
        self.train_rows = [self.encode_pair(p) for p in self.train_pairs]
        self.val_rows = [self.encode_pair(p) for p in self.val_pairs]
        self.lengths = [len(s) + len(t) for s, t in self.train_rows]
        self._epoch_cache: tuple[int, list[list[int]]] = (-1, [])
        self.per_epoch = len(self._epoch(0))  # the same count every epoch

    def encode_pair(self, pair: tuple[str, str]) -> tuple[list[int], list[int]]:
        """Source ids, and target ids framed as BOS target EOS."""
        target = self.tokenizer.encode(pair[1])[:self.context - 1]
        return self.tokenizer.encode(pair[0])[:self.context], [self.bos, *target, self.eos]

    def build_model(self, device: torch.device) -> nn.Module:
        return Seq2Seq(self.model_cfg).to(device)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, length_batches(self.lengths, self.cfg.batch_size,
                                                       self.cfg.seed, epoch))
        return self._epoch_cache[1]

    def train_batch(self, step: int, slot: int):
        epoch, i = divmod(step * self.cfg.grad_accum * self.dist.world + slot, self.per_epoch)
        return self.collate([self.train_rows[j] for j in self._epoch(epoch)[i]])

    def collate(self, rows):
        source, mask = pad_sources([s for s, _ in rows], self.pad)
        width_t = max(len(t) for _, t in rows) - 1
        target_in = torch.full((len(rows), width_t), self.pad, dtype=torch.long)
        target_out = torch.full((len(rows), width_t), IGNORE, dtype=torch.long)
        for i, (_, t) in enumerate(rows):
            target_in[i, :len(t) - 1] = torch.tensor(t[:-1])
            target_out[i, :len(t) - 1] = torch.tensor(t[1:])
        return source, mask, target_in, target_out

    def eval_batches(self, n_batches: int, rank: int, world: int):
        for rows in in_order(self.val_rows, self.cfg.batch_size, n_batches, rank, world):
            yield self.collate(rows)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        source, mask, target_in, target_out = batch
        logits = model(target_in, source=source, source_mask=mask)
        # Smoothing shapes training only: validation loss stays the plain negative log-likelihood.
        smoothing = self.cfg.label_smoothing if model.training else 0.0
        return F.cross_entropy(logits.flatten(0, 1).float(), target_out.flatten(),
                               ignore_index=IGNORE, label_smoothing=smoothing)

    @staticmethod
    def count(batch) -> int:
        return int((batch[3] != IGNORE).sum())

    @staticmethod
    def tokens(batch) -> int:
        return int(batch[1].sum()) + int((batch[3] != IGNORE).sum())

    def val_metrics(self, model: nn.Module, val_loss: float, step: int) -> dict[str, float]:
        if step == 0:
            # An untrained model's greedy output is noise (BLEU ~0), and decoding every source
            # to max_length tokens takes minutes: the loss alone is step 0's baseline.
            return {}
        import sacrebleu

        pairs = self.val_pairs[:200]  # greedy BLEU on a bounded share, to keep evals short
        hypotheses = translate(model, self.tokenizer, [s for s, _ in pairs])
        return {"val_bleu": sacrebleu.corpus_bleu(hypotheses, [[t for _, t in pairs]]).score}

    def sample(self, model: nn.Module) -> str | None:
        if not self.val_pairs:
            return None
        source, target = self.val_pairs[0]
        output = translate(model, self.tokenizer, [source])[0]
        return f"{source}\n>>> {output}\n(reference: {target})"

    def save(self, directory: Path, model: nn.Module) -> None:
        save_model(directory, model, self.tokenizer)

    def load(self, directory: Path, model: nn.Module) -> None:
        saved = read_config(directory)
        if not isinstance(saved, Seq2SeqConfig) or saved != self.model_cfg:
            raise CheckpointMismatch(f"{directory} holds another model than this recipe's: "
                                     "resume with the run's own recipe")
        load_weights(model, directory / WEIGHTS)

    def describe(self) -> dict[str, Any]:
        return {"train_pairs": len(self.train_pairs), "val_pairs": len(self.val_pairs),
                "test_pairs": len(self.test_pairs), "skipped_lines": len(self.skipped)}


register_task("seq2seq", Seq2SeqTask)
