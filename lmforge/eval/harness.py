"""lm-evaluation-harness tasks on lmforge models, through the `lmforge` model type.

lm-eval 0.4.13 knows the model types in its own table (lm_eval/models/__init__.py) and those
registered with `register_model` by code already imported; it reads no package entry
points. So the `lmforge` type (`lmforge.eval.harness_lm`) exists once that module is
imported, which both ways in here do first:

    lmforge eval MODEL --harness hellaswag,arc_easy [--include-path DIR] [--limit N]
        [--num-fewshot K] [--batch-size 8] [--out results.json] [--log-samples]

    python -m lmforge.eval.harness --model lmforge \\
        --model_args pretrained=MODEL[,adapter=DIR,dtype=bf16] --tasks hellaswag \\
        --device cpu --batch_size 8 [--include_path DIR] [any other lm_eval flag]

The second is lm_eval's own command line, unchanged (`lm_eval --help`), so anything it
can do it does for lmforge models. Settings in model_args win over lm_eval's `--device` and
`--batch_size` defaults (cuda:0, falling back to the CPU without a GPU; 1). From Python:
`import lmforge.eval.harness_lm`, then `lm_eval.simple_evaluate(model="lmforge",
model_args={"pretrained": MODEL}, tasks=[...])`.

lm_eval is an optional dependency (`pip install lm-eval`); nothing else in lmforge imports it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal


def run_harness(model: str, tasks: list[str], include_path: str | None = None,
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                device: str | None = None, dtype: str | None = None,
                adapter: str | Literal[False] | None = None, chat: bool = False, log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on the `lmforge` model type; returns the harness's results
    (its "results" key holds each task's metrics)."""
    register()
    import lm_eval

    model_args = {"pretrained": model, "batch_size": batch_size}
    model_args.update({k: v for k, v in (("device", device), ("dtype", dtype),
                                          ("adapter", adapter)) if v is not None})
    return lm_eval.simple_evaluate(
        model="lmforge", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot,
        limit=limit, task_manager=task_manager(tasks, include_path),
        log_samples=log_samples, apply_chat_template=chat)


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm_eval's task index. When every task asked for is a task of the include path, the
    index holds only those: it then skips scanning the harness's thousands of built-in task
    files (about 10 s). A group or tag may name built-in tasks, so those take the full index."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_subtasks):
            return local
    return TaskManager(include_path=include_path)


def register() -> None:
    """Register the `lmforge` model type, or say how to install lm_eval."""
    from lmforge.eval import harness_lm  # noqa: F401  (registering is importing it)


def format_harness(results: dict) -> str:
    """The harness's own result tables (tasks, then groups when there are any)."""
    from lm_eval.utils import make_table

    tables = [make_table(results)]
    if results.get("groups"):
        tables.append(make_table(results, "groups"))
    return "\n".join(tables)


def write_harness(path: str | Path, results: dict) -> Path:
    """The harness's results as JSON (what its --output_path writes)."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                               ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the `lmforge` model type registered."""
    from lmforge.errors import LmforgeError

    try:
        register()
    except LmforgeError as err:
        sys.exit(f"error: {err}")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:  # lm_eval reads sys.argv itself
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
