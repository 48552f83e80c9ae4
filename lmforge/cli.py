"""The `lmforge` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import os
import sys

from lmforge.errors import LmforgeError


def cmd_quickstart(args: argparse.Namespace) -> None:
    from lmforge.quickstart import quickstart_config

    cfg = quickstart_config(args.data, args.overrides, progress=not args.quiet)
    result = _train(cfg, resume=args.resume)
    if result.steps < cfg.max_steps:  # stopped early with Ctrl-C
        print("continue with: lmforge quickstart --resume")
    elif result.final_val_loss is not None:
        print(f"\nvalidation loss {result.final_val_loss:.4f} ({result.final_val_bpb:.3f} "
              f"bits/byte) after {result.steps} steps in {result.wall_seconds / 60:.1f} min")
        print(f"loss curve: {result.run_dir / 'loss.png'}")
    print("next:")
    print(f"  lmforge generate {result.run_dir} --prompt 'ROMEO.' --max-new-tokens 200")
    print(f"  lmforge info {result.run_dir}")


def cmd_train(args: argparse.Namespace) -> None:
    from lmforge.train.config import load_recipe

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe:  # no recipe file, only overrides
        recipe, overrides = None, [recipe, *overrides]
    result = _train(load_recipe(recipe, overrides), resume=args.resume)
    if result.final_val_loss is not None:
        print(f"validation loss {result.final_val_loss:.4f} ({result.final_val_bpb:.3f} bits/byte)")
    print(f"checkpoint: {result.checkpoint}")


def _train(cfg, resume: bool):
    from lmforge.train.trainer import Trainer

    return Trainer(cfg, resume=resume).fit()


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import PrepareConfig, prepare

    out = prepare(PrepareConfig(inputs=args.inputs, out_dir=args.out, tokenizer=args.tokenizer,
                                vocab_size=args.vocab_size, text_field=args.text_field,
                                val_fraction=args.val_fraction, workers=args.workers))
    print(f"prepared: {out}")


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _load(spec: str, args: argparse.Namespace | None = None):
    """Model, tokenizer and stop tokens for any way of naming a model, on the device and in
    the dtype asked for (`--device`, `--dtype`; by default a GPU in bf16 when there is one,
    else the CPU in fp32, where bf16 decoding is no faster)."""
    import torch

    from lmforge.interop.hub import resolve_model
    from lmforge.modeldir import load_model, stop_token_ids

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(args, "dtype", None) or ("bf16" if device.startswith("cuda") else "fp32")
    directory = resolve_model(spec)
    model, tokenizer = load_model(directory, device, getattr(torch, DTYPES[dtype]))
    if tokenizer is None:
        raise FileNotFoundError(f"{spec} has no tokenizer.json to encode text with")
    return model, tokenizer, stop_token_ids(directory, tokenizer)


def _sampling(args: argparse.Namespace):
    from lmforge.infer.sampling import SamplingConfig

    return SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p,
                          args.repetition_penalty)


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.infer.engine import Request, prompt_ids, stream_one

    model, tokenizer, stop = _load(args.model, args)
    request = Request(prompt_ids(tokenizer, args.prompt), args.max_new_tokens, _sampling(args),
                      args.seed, stop=tuple(args.stop), stop_ids=stop)
    sys.stdout.write(args.prompt)
    if args.speculative:
        from lmforge.infer.speculative import speculative_text

        pieces = speculative_text(model, tokenizer, request)
    else:
        pieces = (event.text for event in stream_one(model, tokenizer, request))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.chat import ChatSession, run_terminal_chat

    model, tokenizer, stop = _load(args.model, args)
    session = ChatSession(model, tokenizer, stop, _sampling(args), system=args.system,
                          max_new_tokens=args.max_new_tokens)
    run_terminal_chat(session)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from lmforge.serve.app import ServeConfig, create_app

    model, tokenizer, stop = _load(args.model, args)
    name = args.name or _served_name(args.model)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    cfg = ServeConfig(name, args.api_key, args.max_batch, args.max_queue, args.max_len,
                      timeout=args.timeout, cors_origins=args.cors_origin, compile=args.compile)
    app = create_app(model, tokenizer, stop, cfg)
    print(f"serving {name} on http://{args.host}:{args.port} (chat page at /, API at /v1)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _served_name(spec: str) -> str:
    """The name clients use: a registry name as is, a path by its last part."""
    from pathlib import Path

    return Path(spec.rstrip("/")).name.removesuffix(".gguf") or spec


def cmd_pull(args: argparse.Namespace) -> None:
    from lmforge.interop.hub import pull

    print(pull(args.name))


def cmd_list(args: argparse.Namespace) -> None:
    from lmforge.interop.hub import REGISTRY, list_models

    rows = list_models()
    print(f"{'name':<32} {'size':>9}  source")
    for row in rows:
        print(f"{row['name']:<32} {row['size_bytes'] / 1e6:>7.1f}MB  {row['source']}")
    pulled = {row["name"] for row in rows}
    for name, entry in REGISTRY.items():
        if name not in pulled:
            print(f"{name:<32} {'-':>9}  not pulled: {entry.description}")


def cmd_export(args: argparse.Namespace) -> None:
    from lmforge.interop.hub import resolve_model

    directory = resolve_model(args.model)
    if args.format == "hf":
        from lmforge.interop.hf import export_hf

        print(export_hf(directory, args.out))
    else:
        from lmforge.interop.gguf import export_gguf

        print(export_gguf(directory, args.out, dtype=args.dtype))


def cmd_quantize(args: argparse.Namespace) -> None:
    import time

    from lmforge.interop.hub import resolve_model
    from lmforge.modeldir import directory_bytes
    from lmforge.quant import QuantSpec, quantize_dir

    group_size = 32 if args.bits == 4 and args.group_size is None else args.group_size
    spec = QuantSpec(args.bits, group_size)
    source = resolve_model(args.model)
    start = time.perf_counter()
    out = quantize_dir(source, args.out, spec)
    seconds = time.perf_counter() - start
    before, after = directory_bytes(source), directory_bytes(out)
    print(f"{spec.describe()} model in {out} ({seconds:.1f} s)")
    print(f"size on disk: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / before:.2f}x)")


def cmd_info(args: argparse.Namespace) -> None:
    from lmforge.config import PRESETS, ModelConfig, preset
    from lmforge.interop.hub import resolve_model
    from lmforge.models.decoder import Decoder

    if args.model in PRESETS:
        cfg = preset(args.model)
    else:
        cfg = ModelConfig.load(resolve_model(args.model) / "config.json")
    import torch

    with torch.device("meta"):
        report = Decoder(cfg).flops()
    print(f"model            {args.model}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:<16} {value}")
    print(f"parameters       {report.params:,} ({report.params / 1e6:.1f} M)")
    print(f"  non-embedding  {report.non_embedding_params:,}")
    print(f"FLOPs per token  {report.flops_per_token:,} (training, forward + backward)")
    print(f"                 {report.flops_per_token // 3:,} (inference, forward)")


def cmd_plot(args: argparse.Namespace) -> None:
    from lmforge.train.plot import plot_run

    print(plot_run(args.run, args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Make your own Transformer "
                                     "language models: prepare, train, generate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="corpus -> tokenizer -> small model -> samples, in minutes")
    p.add_argument("--data", help="your own text file/folder/JSONL instead of Shakespeare")
    p.add_argument("--resume", action="store_true", help="continue runs/quickstart")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. max_steps=300")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("prepare", help="text files / folders / JSONL / parquet -> token shards")
    p.add_argument("inputs", nargs="+", help="files or folders")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="bpe", help="bpe | char | path to tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--text-field", default="text", help="JSONL/parquet field with the text")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=0, help="0 = all cores")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pretrain from a YAML recipe with key=value overrides")
    p.add_argument("recipe", nargs="?", help="YAML recipe (see configs/); optional")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. lr=3e-4 model.n_layer=6")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's last checkpoint")
    p.set_defaults(func=cmd_train)

    model_help = ("model directory, run directory, Hugging Face directory, .gguf file, "
                  "registry name (see `lmforge list`) or hf:ORG/NAME")

    def device_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: a GPU "
                       "if there is one)")
        p.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="weights and activations (default: bf16 on a GPU, fp32 on a CPU)")

    def sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float,
                       top_p: float | None) -> None:
        device_flags(p)
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=200)
        p.add_argument("--top-p", type=float, default=top_p)
        p.add_argument("--min-p", type=float, default=None,
                       help="drop tokens below this fraction of the top token's probability")
        p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 avoids repeats")

    p = sub.add_parser("generate", help="sample a continuation of a prompt (streaming)")
    p.add_argument("model", help=model_help)
    p.add_argument("--prompt", default="")
    sampling_flags(p, 200, temperature=0.8, top_p=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text just before TEXT (repeatable)")
    p.add_argument("--speculative", action="store_true",
                   help="draft tokens by copying from the prompt and check them in one pass: "
                        "faster when the output repeats the input; greedy output is unchanged")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a model in the terminal (its chat template)")
    p.add_argument("model", help=model_help)
    p.add_argument("--system", default=None, help="system prompt")
    sampling_flags(p, 512, temperature=0.3, top_p=0.9)  # answers, not stories
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web chat page")
    p.add_argument("model", help=model_help)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model name in the API (default: from MODEL)")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default $LMFORGE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoding together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="waiting requests before new ones get 429")
    p.add_argument("--max-len", type=int, default=None,
                   help="positions per sequence (default: the model's context)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (slow start, faster decoding)")
    device_flags(p)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pull", help="fetch a model into the cache (~/.cache/lmforge/models)")
    p.add_argument("name", help="registry name (see `lmforge list`) or hf:ORG/NAME")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="models in the cache, and the registry's names")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file")
    p.add_argument("model", help=model_help)
    p.add_argument("--format", choices=["hf", "gguf"], required=True)
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf path")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32", help="gguf only")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="int8 or int4 weights: a smaller, faster model directory")
    p.add_argument("model", help=model_help)
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, default=None,
                   help="int4: columns sharing a scale, 32 | 64 | 128 (default 32)")
    p.add_argument("--out", required=True, help="output model directory")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("info", help="parameters and FLOPs per token of a model or preset")
    p.add_argument("model", help="preset name, or " + model_help)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", help="draw a run's loss curve to PNG")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="PNG path (default RUN/loss.png)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (LmforgeError, FileNotFoundError, FileExistsError) as err:
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
