"""Evaluation results: the record every task returns, a terminal table, and a JSON file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


@dataclass
class EvalResult:
    """One task's scores. n counts what was scored: examples, or tokens for perplexity."""

    task: str
    metrics: dict[str, float]
    n: int
    unit: str = "examples"
    details: dict = field(default_factory=dict)  # facts beside the scores (bytes, settings)
    samples: list[dict] = field(default_factory=list)  # one record per example


def format_table(results: list[EvalResult]) -> str:
    """A fixed-width table: task, metric, value, n."""
    rows = [(r.task, name, f"{value:.4f}", f"{r.n} {r.unit}")
            for r in results for name, value in r.metrics.items()]
    header = ("task", "metric", "value", "n")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                                row[2].rjust(widths[2]), row[3].rjust(widths[3])]).rstrip())
    return "\n".join(lines)


def write_results(path: str | Path, results: list[EvalResult], model: str, config: dict,
                  log_samples: bool = False) -> Path:
    """Write the scores (and with `log_samples` every example's record) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for r in results:
        tasks[r.task] = {"metrics": r.metrics, "n": r.n, "unit": r.unit, **r.details}
        if log_samples:
            tasks[r.task]["samples"] = r.samples
    payload = {"model": model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "config": config, "results": tasks}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
