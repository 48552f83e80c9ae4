"""Decoding speed on this CPU: lmforge per weight format, against transformers and llama.cpp.

    python benchmarks/decode.py                            # SmolLM2-135M: fp32, int8, int4 g32
    python benchmarks/decode.py --models smollm2,gemma3    # and Gemma 3 270M (fp32, int8, int4)
    python benchmarks/decode.py --llamacpp /path/to/venv/bin/python   # a llama.cpp column
    python benchmarks/decode.py --no-compile --no-peer     # quick: lmforge eager only
    python benchmarks/decode.py --kv-cache float16         # lmforge's KV cache in float16
    python benchmarks/decode.py --gpu                      # on a CUDA GPU: batch 1 and 32

Each figure comes from a process of its own (so peak RSS is that engine's alone), best of
--repeats: greedy tokens/s for 128 new tokens after "The capital of France is" (the prompt
after BOS, for a model that wants one), batch 1, eager and compiled (`compile=True`, the
first start compiles: its time is reported, later starts reuse the cache); total tokens/s of
8 sequences decoding together, eager and compiled (and its ratio to batch 1 in the same
mode); prefill tokens/s for a 512-token prompt (last logits only); peak RSS after loading and
decoding one answer.

Weights: the registry's GGUF dequantized to fp32 (`lmforge pull`), and `lmforge quantize`
of it: int8 per channel and int4 in groups of 32, whose output projection is int8. The
peers read the same weights: transformers the registry's GGUF (dequantized to fp32);
llama.cpp (llama-cpp-python, in its own environment: --llamacpp names its python, default
this one if `llama_cpp` imports) the registry's GGUF for fp32's row (Q4_1 for SmolLM2,
Q4_K_M for Gemma), and lmforge's own GGUF exports of the int8 and int4 models (Q8_0 and
Q4_1: the same numbers as lmforge's int weights) for theirs, where lmforge writes that
architecture (llama: SmolLM2, not Gemma).

--gpu: SmolLM2-135M's shape with random weights (speed depends on the shape alone, and a GPU
machine may have no way to fetch the model) in bf16 on the GPU, batch 1 and batch 32, eager
and compiled (CUDA graphs), against transformers' `generate` on the same shape.
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from lmforge.config import KV_CACHE_CHOICES

MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
FORMATS = ("fp32", "int8", "int4")
BATCH = 8
PROMPT = "The capital of France is"
NEW_TOKENS = 128
PREFILL = 512
SHAKESPEARE = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinyshakespeare-head.txt"
WORK = Path.home() / ".cache" / "lmforge" / "benchmarks" / "decode"


def best_of(repeats: int, fn) -> float:
    """Fewest seconds `fn` took in `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss, not inherited
    from the benchmark process that started it)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


# ------------------------------------------------------------------ workers (own processes)


def lmforge_worker(directory: str, mode: str, repeats: int, kv_cache: str) -> dict:
    from lmforge.infer.engine import Engine, Request, kv_dtype_named
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.open import open_model

    opened = open_model(directory)
    model, tokenizer = opened.model, opened.tokenizer
    prompt = tokenizer.encode_prompt(PROMPT)
    greedy = SamplingConfig(temperature=0)
    engine = partial(Engine, model, tokenizer, max_len=len(prompt) + NEW_TOKENS,
                     kv_dtype=kv_dtype_named(kv_cache, model))
    request = Request(prompt, NEW_TOKENS, greedy)
    figures: dict = {}
    if mode == "compiled":
        start = time.perf_counter()
        one = engine(max_batch=1, compile=True)
        one.wait_compiled()  # until then it decodes eagerly
        figures["compile_s"] = time.perf_counter() - start
        figures["decode"] = NEW_TOKENS / best_of(repeats, lambda: one.run([request]))
        figures["batch"] = batch_rate(engine(max_batch=BATCH, compile=True), prompt, repeats)
    else:
        one = engine(max_batch=1)
        one.run([Request(prompt, 8, greedy)])  # warm-up: the int kernels' operands
        figures["decode"] = NEW_TOKENS / best_of(repeats, lambda: one.run([request]))
        figures["rss_mb"] = peak_rss_mb()  # loading and decoding one answer, no more
        figures["batch"] = batch_rate(engine(max_batch=BATCH), prompt, repeats)
        long = torch.tensor([tokenizer.encode(SHAKESPEARE.read_text()[:20_000])[:PREFILL]])
        with torch.inference_mode():
            figures["prefill"] = PREFILL / best_of(repeats, lambda: model(long, last_only=True))
    figures.setdefault("rss_mb", peak_rss_mb())
    return figures


def batch_rate(engine, prompt: list[int], repeats: int) -> float:
    """Total tokens/s of BATCH greedy sequences decoding together on `engine`."""
    from lmforge.infer.engine import Request
    from lmforge.infer.sampling import SamplingConfig

    engine.wait_compiled()
    batch = [Request(prompt, NEW_TOKENS, SamplingConfig(temperature=0)) for _ in range(BATCH)]
    engine.run(batch[:1])
    return BATCH * NEW_TOKENS / best_of(repeats, lambda: engine.run(batch))


def transformers_worker(gguf_path: str, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids

    def decode(batch: int):
        return lambda: model.generate(ids.repeat(batch, 1), max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False)

    with torch.inference_mode():
        decode(1)()
        figures = {"decode": NEW_TOKENS / best_of(repeats, decode(1)),
                   "batch": BATCH * NEW_TOKENS / best_of(repeats, decode(BATCH))}
        long = torch.tensor([tok(SHAKESPEARE.read_text()[:20_000]).input_ids[:PREFILL]])
        figures["prefill"] = PREFILL / best_of(repeats, lambda: model(long, logits_to_keep=1))
    figures["rss_mb"] = peak_rss_mb()
    return figures


# llama.cpp runs in its own environment (it is not a dependency of lmforge): this script is
# sent to that python (after `peak_rss_mb`'s source), which prints the figures as JSON.
LLAMA_CPP_WORKER = """
import json, sys, time
from llama_cpp import Llama
path, prompt, new_tokens, repeats, prefill_text = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = Llama(model_path=path, n_ctx=1024, n_threads=2, n_batch=512, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=True)
def decode():
    llm.reset()
    out = 0
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out += 1
        if out == new_tokens:
            break
best = float("inf")
decode()
for _ in range(repeats):
    start = time.perf_counter(); decode(); best = min(best, time.perf_counter() - start)
long = llm.tokenize(prefill_text.encode(), add_bos=True)[:512]
fill = float("inf")
for _ in range(repeats):
    llm.reset(); start = time.perf_counter(); llm.eval(long); fill = min(fill, time.perf_counter() - start)
print(json.dumps({"decode": new_tokens / best, "prefill": len(long) / fill,
                  "rss_mb": peak_rss_mb()}))
"""


def run_worker(args: list[str]) -> dict:
    """Figures of one worker, run as a process of its own."""
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args[:4])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ preparing the weights


def model_dirs(name: str) -> dict[str, Path]:
    """fp32, int8 and int4 model directories of a registry model (quantized once)."""
    from lmforge.compress.quant import QuantSpec
    from lmforge.compress.run import quantize_dir
    from lmforge.interop.hub import resolve_model

    dirs = {"fp32": resolve_model(name)}
    for fmt, spec in (("int8", QuantSpec(8)), ("int4", QuantSpec(4, 32))):
        target = WORK / f"{name}-{fmt}"
        if not (target / "quantization.json").is_file():
            quantize_dir(dirs["fp32"], target, spec, progress=False)
        dirs[fmt] = target
    return dirs


def gguf_files(name: str, dirs: dict[str, Path]) -> dict[str, Path]:
    """The GGUF llama.cpp reads for each format: the registry's, and our int exports."""
    from lmforge.errors import UnsupportedModel
    from lmforge.interop.gguf import export_gguf
    from lmforge.interop.hub import registry_file

    files = {"fp32": registry_file(name)}
    for fmt in ("int8", "int4"):
        target = WORK / f"{name}-{fmt}.gguf"
        try:
            if not target.is_file():
                export_gguf(dirs[fmt], target)
        except UnsupportedModel:  # lmforge writes llama-architecture GGUFs only
            continue
        files[fmt] = target
    return files


# ------------------------------------------------------------------ the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="eager lmforge only")
    parser.add_argument("--no-peer", action="store_true", help="no transformers column")
    parser.add_argument("--llamacpp", default=None,
                        help="python of an environment with llama-cpp-python (default: this "
                             "one, if it has llama_cpp)")
    parser.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="auto",
                        help="lmforge's KV cache number type (auto: the model's own, float16 "
                             "for int8 or int4 weights)")
    parser.add_argument("--gpu", action="store_true", help="the GPU table instead")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu:
        gpu_table(args.repeats)
        return
    if args.worker:
        kind, target, *rest = args.worker
        figures = (lmforge_worker(target, rest[0], args.repeats, args.kv_cache)
                   if kind == "lmforge" else transformers_worker(target, args.repeats))
        print(json.dumps(figures))
        return
    llamacpp = args.llamacpp
    if llamacpp is None:
        try:
            import llama_cpp  # noqa: F401
            llamacpp = sys.executable
        except ImportError:
            pass
    WORK.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, __file__, "--repeats", str(args.repeats), "--kv-cache", args.kv_cache,
          "--worker"]
    rows = []
    for key in args.models.split(","):
        name = MODELS[key]
        dirs = model_dirs(name)
        files = gguf_files(name, dirs) if llamacpp else {}
        for fmt in args.formats.split(","):
            row = {"model": name, "format": fmt,
                   "eager": run_worker([*me, "lmforge", str(dirs[fmt]), "eager"])}
            if not args.no_compile:
                row["compiled"] = run_worker([*me, "lmforge", str(dirs[fmt]), "compiled"])
            if fmt == "fp32" and not args.no_peer:
                from lmforge.interop.hub import registry_file

                row["transformers"] = run_worker([*me, "transformers", str(registry_file(name))])
            if fmt in files:
                script = inspect.getsource(peak_rss_mb) + LLAMA_CPP_WORKER
                row["llama.cpp"] = run_worker([llamacpp, "-c", script, str(files[fmt]),
                                               PROMPT, str(NEW_TOKENS), str(args.repeats),
                                               SHAKESPEARE.read_text()[:20_000]])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, llamacpp is not None)


def gpu_table(repeats: int) -> None:
    """Decoding tokens/s on the GPU, lmforge (eager, compiled) and transformers, batch 1 and 32."""
    if not torch.cuda.is_available():
        print("no CUDA GPU here: skipping the GPU decoding benchmark")
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.config import preset
    from lmforge.infer.engine import Engine, Request
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.models.decoder import Decoder

    cfg = preset("smollm2-135m", context_length=1024)
    torch.manual_seed(0)
    model = Decoder(cfg).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (6,)).tolist()
    greedy = SamplingConfig(temperature=0)

    def lmforge_rate(batch: int, compile: bool) -> float:
        engine = Engine(model, None, max_batch=batch, max_len=len(prompt) + NEW_TOKENS,
                        compile=compile)
        requests = [Request(prompt, NEW_TOKENS, greedy) for _ in range(batch)]
        engine.run(requests)  # warm-up (and compilation, CUDA graph capture)
        return batch * NEW_TOKENS / best_of(repeats, lambda: (engine.run(requests),
                                                              torch.cuda.synchronize()))

    peer = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head, tie_word_embeddings=True,
        max_position_embeddings=1024)).to("cuda", torch.bfloat16).eval()
    peer.generation_config.eos_token_id = None

    def transformers_rate(batch: int) -> float:
        ids = torch.tensor([prompt] * batch, device="cuda")

        def run():
            peer.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()

        with torch.inference_mode():
            run()
            return batch * NEW_TOKENS / best_of(repeats, run)

    print(f"\nSmolLM2-135M's shape, bf16, {torch.cuda.get_device_name()}: greedy tokens/s, "
          f"{NEW_TOKENS} new tokens\n")
    print("| batch | lmforge | lmforge compiled | transformers | best / transformers |\n"
          "|---|---|---|---|---|")
    for batch in (1, 32):
        eager, compiled = lmforge_rate(batch, False), lmforge_rate(batch, True)
        theirs = transformers_rate(batch)
        print(f"| {batch} | {eager:,.0f} | {compiled:,.0f} | {theirs:,.0f} | "
              f"{max(eager, compiled) / theirs:.2f}x |", flush=True)


def print_table(rows: list[dict], llamacpp: bool) -> None:
    print(f"\ngreedy decoding, {NEW_TOKENS} new tokens, {torch.get_num_threads()} threads; "
          "tokens/s (peak RSS)\n")
    head = ["model", "weights", "lmforge", "compiled", f"batch {BATCH} (x batch 1)",
            f"compiled batch {BATCH}", "prefill 512",
            "transformers", "llama.cpp", "best / transformers", "best / llama.cpp"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        eager, compiled = row["eager"], row.get("compiled")
        best = max(eager["decode"], compiled["decode"] if compiled else 0)
        cells = [row["model"], row["format"],
                 f"{eager['decode']:.1f} ({eager['rss_mb']:.0f} MB)",
                 f"{compiled['decode']:.1f} (ready in {compiled['compile_s']:.0f} s)"
                 if compiled else "-",
                 f"{eager['batch']:.1f} ({eager['batch'] / eager['decode']:.1f}x)",
                 f"{compiled['batch']:.1f} ({compiled['batch'] / compiled['decode']:.1f}x)"
                 if compiled else "-",
                 f"{eager['prefill']:.0f}"]
        peers = [row.get("transformers"), row.get("llama.cpp")]
        cells += [f"{fig['decode']:.1f} ({fig['rss_mb']:.0f} MB)" if fig else "-" for fig in peers]
        cells += [f"{best / fig['decode']:.2f}x" if fig else "-" for fig in peers]
        print("| " + " | ".join(cells) + " |")
    if llamacpp:
        print("\nllama.cpp reads the registry's GGUF for fp32's row and lmforge's own Q8_0 / "
              "Q4_1 exports of the int8 / int4 models for theirs.")


if __name__ == "__main__":
    main()
