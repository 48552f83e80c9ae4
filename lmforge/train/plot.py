"""The loss curve of a run, from its metrics.jsonl, as a PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.errors import CorruptFile


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl. A last line that is not JSON was torn by a kill
    mid-write: it is left out, with a warning. A damaged line before it is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: is it a training run directory?")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as err:
            if number < len(lines):
                raise CorruptFile(f"{path}:{number} is not a JSON record ({err}); delete or "
                                  "repair that line") from err
            print(f"warning: {path}:{number} is an unfinished record (the run was stopped while "
                  "writing it); leaving it out", file=sys.stderr)
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training and validation loss against steps; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", color="#4C72B0", alpha=0.8, linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation", color="#DD8452", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(Path(run_dir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
