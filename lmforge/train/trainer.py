"""The training loop, shared by every task and by 1 or N processes.

`Trainer(cfg).fit()` lets the recipe's task (`lmforge.train.task`: pretraining, chat SFT,
classification) prepare its data and build its model, then runs optimizer steps until
`max_steps`: gradient accumulation, DDP or FSDP2 under torchrun, bf16 on GPU, periodic
validation (loss and the task's own figures), samples, atomic checkpoints (sharded under
FSDP), metrics.jsonl and a loss-curve PNG. A run directory can be resumed exactly
(`resume=True`), a sharded one on any number of ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lmforge.errors import CheckpointMismatch, ConfigError, LmforgeError, RankLost, TrainingDiverged
from lmforge.files import disk_full_reported, read_json_object
from lmforge.modeldir import CHECKPOINT_DONE, checkpoint_dirs, is_sharded_checkpoint
from lmforge.train import distributed as distr
from lmforge.train.checkpoint import load_checkpoint, recover_checkpoints, save_checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.lm import LanguageModelingTask  # noqa: F401  (registers task=lm)
from lmforge.train.optim import build_optimizer
from lmforge.train.plot import plot_run, read_metrics
from lmforge.train.schedule import lr_at
from lmforge.train.seq2seq import Seq2SeqTask  # noqa: F401  (registers task=seq2seq)
from lmforge.train.sharded import ShardedCheckpointer, load_sharded
from lmforge.train.task import load_task, task_class

# Dense bf16 peak FLOP/s per GPU, for MFU: the accelerators people are likely to have.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
                   "A10": 125e12, "4090": 165e12, "3090": 71e12}


class _StopFlag:
    requested = False


@contextlib.contextmanager
def _stop_on_signals():
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second
    one interrupts at once. Stopping between steps means no half-applied optimizer update
    ever reaches a checkpoint. SIGTERM (a job scheduler's, or torchrun's when another rank
    failed) asks the same, once: the launcher kills what is still running 30 s later."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def interrupt(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to abort)")

    def terminate(signum, frame):
        flag.requested = True

    previous = signal.signal(signal.SIGINT, interrupt), signal.signal(signal.SIGTERM, terminate)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_val_loss: float | None
    final_val_bpb: float | None
    wall_seconds: float
    tokens_per_second: float
    ms_per_step: float
    checkpoint: Path | None
    final_metrics: dict[str, float] = field(default_factory=dict)
    rank: int = 0  # this process's rank under torchrun: only rank 0 reports


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        task_class(cfg.task)  # an unknown task fails before any work
        self.device = resolve_device(cfg.device)
        self.dist = distr.init_distributed(self.device.type)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.run_dir = Path(cfg.out_dir)
        self.task = load_task(cfg, self.dist)
        self.tokenizer, self.context = self.task.tokenizer, self.task.context

        torch.manual_seed(cfg.seed)
        self.model = self.task.build_model(self.device)
        for module in self.model.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = cfg.grad_checkpointing
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        # Under FSDP every rank takes part in every forward pass (each gathers the others'
        # shards), including validation and samples.
        self.fsdp = cfg.parallel == "fsdp" and self.dist.world > 1
        if self.fsdp:
            if cfg.cpu_offload and self.device.type != "cuda":
                raise ConfigError("cpu_offload moves GPU state to host memory; on a CPU it is "
                                  "there already: remove cpu_offload")
            distr.shard_model(self.model, self.device, self.bf16, cfg.cpu_offload)
        self.optimizer = build_optimizer(self.model, cfg, self.device.type)
        self.checkpointer = ShardedCheckpointer(self.run_dir, cfg.keep_checkpoints, self.dist,
                                                cfg.async_checkpoint) \
            if cfg.parallel == "fsdp" else None
        self.step, self.elapsed_before, self.tokens_seen = 0, 0.0, 0
        self._t_start = time.perf_counter()
        if self.dist.is_main:
            recover_checkpoints(self.run_dir)  # finish what a run killed mid-save left
        distr.barrier(self.dist)
        if resume:
            self._resume()
        elif checkpoint_dirs(self.run_dir):  # every rank: none may go on alone
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                "or choose another out_dir"
            )
        self.train_model: torch.nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.model)
        if self.dist.world > 1 and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Gradients live in DDP's communication buckets instead of beside them.
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids,
                                                       gradient_as_bucket_view=True)

    def _resume(self) -> None:
        checkpoints = checkpoint_dirs(self.run_dir)
        if not checkpoints:
            raise FileNotFoundError(f"nothing to resume: {self.run_dir} has no checkpoints yet")
        latest = checkpoints[-1]
        if is_sharded_checkpoint(latest):
            self._check_resumable(read_json_object(latest / CHECKPOINT_DONE), latest)
            state = load_sharded(latest, self.model, self.optimizer, self.dist.rank)
        elif self.fsdp:
            raise CheckpointMismatch(f"{latest} was written by a run with parallel=ddp (or one "
                                     "process): resume it with parallel=ddp")
        else:
            state = load_checkpoint(latest, lambda d: self.task.load(d, self.model),
                                    self.optimizer)
            self._check_resumable(state, latest)
        self.step, self.elapsed_before = state["step"], state.get("elapsed", 0.0)
        self.tokens_seen = state.get("tokens", 0)

    def _check_resumable(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Refuse to continue a run on other terms than it started: another model or task
        (which a sharded checkpoint cannot tell by itself), or another global batch."""
        saved, cfg = state.get("recipe", {}), self.cfg
        for key in ("task", "model", "init_from", "lora_rank", "lora_targets"):
            if key in saved and saved[key] != getattr(cfg, key):
                raise CheckpointMismatch(f"{checkpoint} was trained with {key}={saved[key]!r}, "
                                         f"this recipe has {getattr(cfg, key)!r}: resume with "
                                         "the run's own recipe")
        if "batch_size" not in saved:
            return
        world = state.get("world", 1)
        before = saved["batch_size"] * saved["grad_accum"] * world
        now = cfg.batch_size * cfg.grad_accum * self.dist.world
        if before != now:
            per_step = cfg.batch_size * self.dist.world
            fix = (f"set grad_accum={before // per_step} to keep it" if before % per_step == 0
                   else "choose batch_size and grad_accum that make it again")
            raise CheckpointMismatch(
                f"{checkpoint} was trained with {before} sequences per step (batch_size "
                f"{saved['batch_size']} x grad_accum {saved['grad_accum']} x {world} rank(s)); "
                f"this run would take {now} ({cfg.batch_size} x {cfg.grad_accum} x "
                f"{self.dist.world}): {fix}")

    # The loop ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        except RuntimeError as err:
            if self.dist.world == 1 or isinstance(err, LmforgeError):
                raise
            raise self._lost(err) from err

    def _lost(self, err: RuntimeError) -> Exception:
        """What to tell when a collective operation failed: which ranks are gone, if any."""
        if threading.current_thread() is threading.main_thread():
            # torchrun stops the ranks still running when one fails: time to say why first.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lost = distr.lost_ranks(self.dist)
        if lost == []:
            return err  # everyone is here: a failure of its own kind
        who = (f"rank {', '.join(map(str, lost))} stopped (killed, crashed or unreachable)"
               if lost else "another rank, or the launcher's store, stopped")
        latest = checkpoint_dirs(self.run_dir)
        where = (f"the last complete checkpoint is {latest[-1]}" if latest else
                 "no checkpoint was written yet")
        # gloo's and NCCL's first sentence, without the source location before it
        reason = str(err).splitlines()[0].split("] ", 1)[-1].split(". ")[0][:200]
        return RankLost(f"{who} at step {self.step + 1}, so rank {self.dist.rank} cannot go on "
                        f"({reason}); {where}: start the job again with --resume")

    def _fit(self) -> TrainResult:
        cfg, d = self.cfg, self.dist
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._trim_metrics()
        flops_per_token = self.model.flops().flops_per_token
        peak = self._peak_flops()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and d.is_main),
                   unit="step", dynamic_ncols=True)
        start_step, tokens_at_start, t_start = self.step, self.tokens_seen, time.perf_counter()
        self._t_start = t_start
        metrics: dict[str, float] = {}
        last_saved: Path | None = None
        with _stop_on_signals() as stop:
            last_log = (self.tokens_seen, time.perf_counter())
            while self.step < cfg.max_steps and not distr.any_rank(stop.requested, d, self.device):
                # A resumed run already evaluated the step it resumes from.
                first = self.step == start_step and self.step > 0
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and not first:
                    metrics = self._evaluate(bar, t_start)
                    if self.step > start_step and self._checkpoint_due(evaluating=True):
                        last_saved = self._save()
                    last_log = (self.tokens_seen, time.perf_counter())
                loss = self._train_step()
                self.step += 1
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    # Throughput since the last log line, evaluations and saves excluded.
                    now = time.perf_counter()
                    tps = (self.tokens_seen - last_log[0]) / (now - last_log[1])
                    record = {"step": self.step, "train_loss": loss, "lr": self._lr(self.step - 1),
                              "tokens": self.tokens_seen, "tokens_per_s": round(tps),
                              "time": self._elapsed(t_start)}
                    postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
                    if peak:
                        record["mfu"] = flops_per_token * tps / (peak * d.world)
                        postfix["mfu"] = f"{record['mfu']:.1%}"
                    self._log(record)
                    bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if cfg.sample_interval and self.step % cfg.sample_interval == 0:
                    self._print_sample(bar)
                if self.step == cfg.halt_at:
                    break
                if self.step % cfg.log_interval == 0:
                    last_log = (self.tokens_seen, time.perf_counter())
                if self._checkpoint_due(evaluating=False):
                    last_saved = self._save()
                    last_log = (self.tokens_seen, time.perf_counter())
            if self.step == cfg.max_steps:
                metrics = self._evaluate(bar, t_start)
            last_saved = self._save()
            if self.checkpointer is not None:
                self.checkpointer.wait()
        bar.close()
        if self.step < cfg.max_steps and self.step != cfg.halt_at and d.is_main:
            print(f"interrupted: saved step {self.step} to {last_saved}; continue with --resume")
        wall = time.perf_counter() - t_start
        steps_run = max(self.step - start_step, 1)
        if self.step == cfg.max_steps:
            self._print_sample(None)
        if d.is_main:
            plot_run(self.run_dir)
        distr.shutdown(d)
        return TrainResult(
            run_dir=self.run_dir, steps=self.step, final_val_loss=metrics.get("val_loss"),
            final_val_bpb=metrics.get("val_bpb"), wall_seconds=wall,
            tokens_per_second=(self.tokens_seen - tokens_at_start) / wall,
            ms_per_step=1000 * wall / steps_run, checkpoint=last_saved, final_metrics=metrics,
            rank=d.rank,
        )

    def _train_step(self) -> float:
        cfg, d = self.cfg, self.dist
        lr = self._lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.train_model.train()
        total = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device, dtype=torch.int64)
        for micro in range(cfg.grad_accum):
            batch = self.task.train_batch(self.step, slot=micro * d.world + d.rank)
            tokens += self.task.tokens(batch)
            batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            last = micro == cfg.grad_accum - 1
            # Only the last micro-batch reduces gradients; the others just accumulate.
            sync = contextlib.nullcontext()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            elif not last and d.world > 1:
                sync = self.train_model.no_sync()
            with sync, self._autocast():
                loss = self.task.loss(self.train_model, batch)
                (loss / cfg.grad_accum).backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = distr.all_mean(total / cfg.grad_accum, d).item()
        self.tokens_seen += int(distr.all_sum(tokens, d))
        if not math.isfinite(loss):
            latest = checkpoint_dirs(self.run_dir)
            where = f"the last good checkpoint is {latest[-1]}" if latest else "no checkpoint was saved yet"
            raise TrainingDiverged(
                f"loss became {loss} at step {self.step + 1}; {where}. Try a lower lr, a longer "
                "warmup_steps or grad_clip=1.0, then --resume"
            )
        return loss

    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> dict[str, float]:
        """Validation loss (`val_loss`, nats per scored target) and the task's own figures;
        n_batches 0 = the whole split. Empty when there is no validation split."""
        n_batches = self.cfg.eval_batches if n_batches is None else n_batches
        self.model.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for batch, counted in self._rank_batches(n_batches):
            with self._autocast():
                loss = self.task.loss(self.model, tuple(t.to(self.device) for t in batch))
            n = self.task.count(batch) if counted else 0
            total += torch.tensor([loss.item() * n, n], device=self.device, dtype=torch.float64)
        total = distr.all_sum(total, self.dist)
        if total[1] == 0:
            return {}
        val_loss = float(total[0] / total[1])
        with self._whole():
            figures = self.task.val_metrics(self.model, val_loss, self.step)
        return {"val_loss": val_loss, **figures}

    def _rank_batches(self, n_batches: int):
        """This rank's validation batches, each with whether it counts. Under FSDP every rank
        runs as many forward passes as the busiest one (the others repeat a batch, uncounted):
        each pass gathers parameters from all ranks."""
        batches = self.task.eval_batches(n_batches, self.dist.rank, self.dist.world)
        if not self.fsdp:
            yield from ((batch, True) for batch in batches)
            return
        batches = list(batches)
        most = distr.all_max(len(batches), self.dist, self.device)
        spare = batches[0] if batches else self.task.train_batch(0, 0)
        yield from ((batch, True) for batch in batches)
        yield from ((spare, False) for _ in range(most - len(batches)))

    def _evaluate(self, bar, t_start: float) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics and self.dist.is_main:
            self._log({"step": self.step, **metrics, "time": self._elapsed(t_start)})
            shown = ", ".join(_show(k, v) for k, v in metrics.items())
            bar.write(f"step {self.step:>6}: {shown}")
        return metrics

    def _print_sample(self, bar) -> None:
        if not (self.dist.is_main or self.fsdp) or self.cfg.sample_tokens == 0:
            return
        self.model.eval()
        with self._whole():
            text = self.task.sample(self.model)
        if text is not None and self.dist.is_main:
            (bar.write if bar else print)(f"--- sample at step {self.step} ---\n{text}\n---")

    # Helpers -----------------------------------------------------------------------------

    def _lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, lr=c.lr, min_lr=c.min_lr, warmup=c.warmup_steps, total=c.max_steps,
                     kind=c.schedule, decay_fraction=c.decay_fraction)

    def _whole(self):
        """The model with every shard gathered (under FSDP), for generation."""
        return distr.gathered(self.model) if self.fsdp else contextlib.nullcontext()

    def _autocast(self):
        # Under FSDP the mixed-precision policy computes in bf16 already.
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.bf16 and not self.fsdp)

    def _checkpoint_due(self, evaluating: bool) -> bool:
        interval = self.cfg.checkpoint_interval
        if interval == 0:
            return evaluating
        return not evaluating and self.step % interval == 0

    def _save(self) -> Path | None:
        path = None
        state = {"elapsed": self._elapsed(self._t_start), "tokens": self.tokens_seen,
                 "world": self.dist.world, "recipe": self.cfg.to_dict()}
        if self.checkpointer is not None:
            return self.checkpointer.save(self.step, self.model, self.optimizer, state)
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir, self.step, lambda d: self.task.save(d, self.model),
                                   self.optimizer, state, keep=self.cfg.keep_checkpoints)
        distr.barrier(self.dist)
        return path

    def _elapsed(self, t_start: float) -> float:
        return round(self.elapsed_before + time.perf_counter() - t_start, 3)

    def _log(self, record: dict[str, Any]) -> None:
        advice = "free some space, then continue the run with --resume"
        with (disk_full_reported(self.run_dir, "metrics.jsonl", advice),
              open(self.run_dir / "metrics.jsonl", "a") as f):
            f.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """Drop records past the step we resume from (they will be written again) and a line
        torn by a kill."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [r for r in read_metrics(self.run_dir) if r["step"] <= self.step] if self.step else []
        # Rewritten beside and renamed: a kill now must not cost the run its history.
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(partial, path)

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _show(key: str, value: float) -> str:
    names = {"val_loss": "val loss", "val_bpb": "bits/byte", "val_acc": "accuracy",
             "val_macro_f1": "macro-F1"}
    if key == "val_bpb":
        return f"{value:.3f} {names[key]}"
    return f"{names.get(key, key)} {value:.4f}"
