"""How soon `lmforge serve --compile` answers after it starts, and when it decodes compiled.

    python benchmarks/serve_start.py [MODEL] [--starts 2] [--fresh-cache]

Starts the server --starts times in a row, each a new process on the same model (default
smollm2-135m-instruct; --fresh-cache gives the first start an empty compile cache, as on a
machine that never compiled this model, and the later starts that cache). For each start:
seconds from launching the process to the first answer (a greedy 8-token completion),
seconds until `/health` says decode steps run compiled (completions keep the engine
stepping meanwhile), and greedy tokens/s of a 128-token completion then, against the same
completion before the switch (eager).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_serve import free_port  # noqa: E402

PROMPT = "The capital of France is"


def complete(url: str, tokens: int) -> float:
    """Tokens/s of one greedy completion of at most `tokens` tokens."""
    start = time.perf_counter()
    reply = httpx.post(url + "/v1/completions", timeout=600, json={
        "prompt": PROMPT, "max_tokens": tokens, "temperature": 0})
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"] / (time.perf_counter() - start)


def one_start(model: str, env: dict[str, str]) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launched = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", model, "--compile",
                               "--port", str(port), "--max-batch", "1", "--max-len", "512"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            try:
                complete(url, 8)
                break
            except httpx.TransportError:
                if server.poll() is not None:
                    sys.exit(f"lmforge serve stopped:\n{server.stderr.read().decode()}")
                time.sleep(0.05)
        figures = {"first_answer_s": time.perf_counter() - launched,
                   "eager_tok_s": complete(url, 128)}
        while not httpx.get(url + "/health").json()["compiled"]:
            complete(url, 8)
        figures["compiled_s"] = time.perf_counter() - launched
        figures["compiled_tok_s"] = max(complete(url, 128) for _ in range(3))
        return figures
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--fresh-cache", action="store_true",
                        help="the first start compiles from nothing (an empty compile cache)")
    args = parser.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as fresh:
        if args.fresh_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = fresh
        print(f"lmforge serve {args.model} --compile --max-batch 1 --max-len 512; "
              f"{os.cpu_count()} CPUs", flush=True)
        print("| start | first answer | compiled after | tok/s while compiling | compiled tok/s |\n"
              "|---|---|---|---|---|", flush=True)
        for start in range(1, args.starts + 1):
            f = one_start(args.model, env)
            print(f"| {start} | {f['first_answer_s']:.1f} s | {f['compiled_s']:.1f} s | "
                  f"{f['eager_tok_s']:.1f} | {f['compiled_tok_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
