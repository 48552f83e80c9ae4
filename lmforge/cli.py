"""The `lmforge` command: parses arguments and calls the library; no logic of its own.

Every value is checked while the arguments are parsed, so a bad one is a one-line error
before any work starts; errors meant for people (`LmforgeError`) print as one line too.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lmforge.config import (
    KV_CACHE_CHOICES,
    MAX_NEW_TOKENS,
    PERPLEXITY_WINDOW,
    PREFILL_CHUNK,
    SPECULATIVE_DRAFT,
    SamplingConfig,
)
from lmforge.errors import LmforgeError

SAMPLING = SamplingConfig()  # the defaults every command shares (see lmforge.infer.sampling)


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
    from lmforge.api import load_recipe

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe:  # no recipe file, only overrides
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_recipe(recipe, overrides)
    result = _train(cfg, resume=args.resume)
    if result.final_metrics:
        print(", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items()))
    print(f"checkpoint: {result.checkpoint}")
    print(f"next: {_next_command(cfg, result.run_dir)}")


# The command that puts what a run made to use, by task.
_NEXT_COMMANDS = {
    "lm": "lmforge generate {run} --max-new-tokens 200",
    "sft": "lmforge chat {run}",
    "classify": "lmforge predict {run}",
    "seq2seq": "lmforge translate {run} --text 'a sentence to translate'",
    "vlm": "lmforge generate {run} --chat --image IMAGE --prompt 'What is in the image?'",
    "distill": "lmforge generate {run} --max-new-tokens 200",
}


def _next_command(cfg, run_dir) -> str:
    command = _NEXT_COMMANDS[cfg.task]
    if cfg.parallel != "fsdp":
        return command.format(run=run_dir)
    model = f"{run_dir}/model"
    return (f"lmforge export {run_dir} --format lmforge --out {model}  (its checkpoints are "
            f"sharded), then {command.format(run=model)}")


def _train(cfg, resume: bool):
    """Train; under torchrun, only rank 0 goes on to report (the others exit here)."""
    from lmforge.api import Trainer

    result = Trainer(cfg, resume=resume).fit()
    if result.rank:
        sys.exit(0)
    return result


def cmd_finetune(args: argparse.Namespace) -> None:
    from lmforge.api import finetune_recipe

    flags = {"task": args.task, "val_data": args.val_data, "out_dir": args.out,
             "epochs": args.epochs, "max_steps": args.max_steps, "lr": args.lr,
             "batch_size": args.batch_size, "lora_rank": 0 if args.full else args.lora_rank,
             "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
             "lora_targets": args.lora_targets, "text_field": args.text_field,
             "label_field": args.label_field, "context_length": args.context_length}
    flags = [f"{k}={v}" for k, v in flags.items() if v is not None]
    flags += [f"{k}=true" for k in ("packing", "truncate", "grad_checkpointing")
              if getattr(args, k)]
    if args.max_steps is not None:
        flags.append("epochs=0")
    cfg = finetune_recipe(args.model, args.data, args.recipe, flags + list(args.overrides))
    result = _train(cfg, resume=args.resume)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items())
    if shown:
        print(shown)
    print(f"checkpoint: {result.checkpoint}")
    kind = "adapter" if cfg.lora_rank else "model"
    print(f"next: {_next_command(cfg, result.run_dir)}"
          + (f"   (or fold the {kind} in: lmforge merge {result.run_dir} --out DIR)"
             if cfg.lora_rank else ""))


def cmd_translate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lmforge.errors import ConfigError
    from lmforge.infer.seq2seq import too_long, translate
    from lmforge.models.seq2seq import Seq2Seq

    texts = list(args.text)
    if args.file:
        texts += _read_lines(args.file)
    if not texts:
        raise ConfigError("nothing to translate: pass --text TEXT (repeatable) or --file FILE")
    sampled = any(getattr(args, k) is not None for k in ("temperature", "top_k", "top_p"))
    if sampled and args.beam != 1:
        raise ConfigError("--temperature, --top-k and --top-p sample one output per source: "
                          "use them with --beam 1 (beam search is deterministic)")
    opened = _open(args.model, args)
    if not isinstance(opened.model, Seq2Seq):
        raise ConfigError(f"{args.model} is a decoder-only model; translate takes an "
                          "encoder-decoder (train one with task=seq2seq)")
    model, tokenizer = opened.model, opened.tokenizer
    cut = too_long(model, tokenizer, texts)
    if cut:
        lines = ", ".join(str(i + 1) for i in cut[:10]) + (" ..." if len(cut) > 10 else "")
        print(f"warning: {len(cut)} source(s) longer than the model's {model.cfg.max_length} "
              f"tokens were cut to fit (line {lines})", file=sys.stderr)
    out = translate(model, tokenizer, texts, beam=args.beam, max_new_tokens=args.max_new_tokens,
                    length_penalty=args.length_penalty, sampling=_sampling(args), seed=args.seed)
    if args.out:
        Path(args.out).write_text("".join(line + "\n" for line in out), encoding="utf-8")
        print(f"{len(out)} lines -> {args.out}")
    else:
        print("\n".join(out))


def _read_lines(path: str) -> list[str]:
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return Path(path).read_text(encoding="utf-8").splitlines()


def cmd_merge(args: argparse.Namespace) -> None:
    from lmforge.api import merge

    print(merge(args.adapter_dir, args.out, base=args.base))


def cmd_predict(args: argparse.Namespace) -> None:
    from lmforge.api import load_classifier, predict
    from lmforge.errors import ConfigError

    texts = list(args.text)
    if args.file:
        texts += [line for line in _read_lines(args.file) if line.strip()]
    if not texts:
        raise ConfigError("nothing to classify: pass --text TEXT (repeatable) or --file FILE")
    model, tokenizer = load_classifier(args.model, args.device)
    for text, probs in zip(texts, predict(model, tokenizer, texts)):
        best = next(iter(probs))
        shown = "  ".join(f"{label} {p:.3f}" for label, p in probs.items())
        print(f"{best}\t{shown}\t{text[:60]}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import PrepareConfig, prepare

    out = prepare(PrepareConfig(inputs=args.inputs, out_dir=args.out, tokenizer=args.tokenizer,
                                vocab_size=args.vocab_size, text_field=args.text_field,
                                val_fraction=args.val_fraction, workers=args.workers))
    print(f"prepared: {out}")


def _open(spec: str, args: argparse.Namespace):
    """The model `spec` names (`lmforge.open_model`) on the asked device and dtype, with its
    tokenizer required."""
    from lmforge.open import open_model

    opened = open_model(spec, args.device, args.dtype, getattr(args, "adapter", None))
    if opened.tokenizer is None:
        raise FileNotFoundError(f"{spec} has no tokenizer.json to encode text with")
    return opened


def _language_model(spec: str, args: argparse.Namespace):
    """The language model `spec` names (decoder-only, or vision-language), for the commands
    that continue text."""
    from lmforge.errors import ConfigError
    from lmforge.models import VLM
    from lmforge.models.decoder import Decoder
    from lmforge.models.seq2seq import Seq2Seq

    opened = _open(spec, args)
    if isinstance(opened.model, Seq2Seq):
        raise ConfigError(f"{spec} is an encoder-decoder (seq2seq) model: use `lmforge "
                          "translate` or `lmforge serve` with it")
    if not isinstance(opened.model, Decoder | VLM):
        raise ConfigError(f"{spec} is a {type(opened.model).__name__}, not a language model "
                          "(use `lmforge predict` with a classifier)")
    return opened


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    """The sampling settings given, the shared defaults for the others."""
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "min_p",
                                           "repetition_penalty")}
    return SamplingConfig(**{k: v for k, v in given.items() if v is not None})


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.chat import prompt_with_images
    from lmforge.infer.engine import Request, stream_one

    opened = _language_model(args.model, args)
    model, tokenizer = opened.model, opened.tokenizer
    prompt, images = prompt_with_images(opened.processor, tokenizer, args.prompt, args.image,
                                        args.chat)
    request = Request(prompt, args.max_new_tokens, _sampling(args), args.seed,
                      stop=tuple(args.stop), stop_ids=opened.stop_ids, images=images,
                      constraint=_constraint(args))
    if not args.chat:
        sys.stdout.write(args.prompt)
    draft = SPECULATIVE_DRAFT if args.speculative else 0
    for event in stream_one(model, tokenizer, request, draft):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    print()


def _constraint(args: argparse.Namespace):
    """The constraint of `generate`'s --json-schema / --regex / --grammar, checked."""
    from lmforge.infer.constrain import Constraint

    if args.json_schema:
        constraint = Constraint("json_schema", _read_text(args.json_schema, "--json-schema"))
    elif args.regex:
        constraint = Constraint("regex", args.regex)
    elif args.grammar:
        constraint = Constraint("grammar", _read_text(args.grammar, "--grammar"))
    else:
        return None
    constraint.grammar()
    return constraint


def _read_text(path: str, flag: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    return file.read_text()


def cmd_embed(args: argparse.Namespace) -> None:
    import numpy as np

    from lmforge.errors import ConfigError
    from lmforge.infer.embed import embed_texts

    opened = _language_model(args.model, args)
    source = Path(args.file)
    if not source.is_file():
        raise FileNotFoundError(f"--file {args.file}: no such file")
    texts = [line for line in source.read_text().splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"{args.file} has no text: write one text a line")
    vectors = embed_texts(opened.model, opened.tokenizer, texts, args.batch_size)
    out = Path(args.out or source.with_suffix(".npy"))
    np.save(out, vectors.numpy())
    print(f"wrote {len(texts)} embeddings of {vectors.shape[1]} dimensions to {out}")


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.chat import ChatSession, run_terminal_chat

    opened = _language_model(args.model, args)
    session = ChatSession(opened.model, opened.tokenizer, opened.stop_ids, _sampling(args),
                          system=args.system, max_new_tokens=args.max_new_tokens,
                          processor=opened.processor)
    run_terminal_chat(session)


def cmd_serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from lmforge.infer.engine import kv_dtype_named
    from lmforge.serve.app import ServeConfig, create_app

    # Each thread that runs torch's parallel work keeps a team of OpenMP threads, and those
    # teams slow down (they stop spinning while they wait) once they hold more threads than
    # there are cores: decoding on the engine thread ran at 55% speed on 2 cores after the
    # model was loaded here with 2. So this thread (loading, handling requests) uses one,
    # and the engine thread all of them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    opened = _open(args.model, args)
    name = args.name or _served_name(args.model)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    body_bytes = None if args.max_body_mb is None else int(args.max_body_mb * 2**20)
    cfg = ServeConfig(name, args.api_key, args.max_batch, args.max_queue, args.max_len,
                      max_body_bytes=body_bytes, timeout=args.timeout,
                      cors_origins=args.cors_origin, compile=args.compile,
                      kv_dtype=kv_dtype_named(args.kv_cache, opened.model),
                      prefill_chunk=args.prefill_chunk,
                      draft=SPECULATIVE_DRAFT if args.speculative else 0,
                      max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                      allow_image_urls=args.allow_image_urls, threads=threads)
    app = create_app(opened.model, opened.tokenizer, opened.stop_ids, cfg, opened.processor)
    engine = app.state.engine
    whole = engine.cache_bytes(len(engine.slots)) / 1e9
    print(f"KV cache: {len(engine.slots)} sequences x {engine.max_len} positions, "
          + (f"{whole:.2f} GB" if args.compile else
             f"up to {whole:.2f} GB, allocated as the sequences reach their positions"),
          file=sys.stderr)
    print(f"serving {name} on http://{args.host}:{args.port} (chat page at /, API at /v1)",
          file=sys.stderr)
    # Requests still running after SIGTERM get a few seconds, then are cut off.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=3)


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


def _model_dir(args: argparse.Namespace):
    """The model directory MODEL names, with --adapter, or the adapter MODEL holds (a LoRA
    run), folded in (into a temporary directory removed at exit) for commands that work on
    files."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from lmforge.api import merge
    from lmforge.config import Seq2SeqConfig
    from lmforge.errors import ConfigError
    from lmforge.modeldir import is_adapter_dir, is_model_dir, read_config
    from lmforge.open import resolve_model
    from lmforge.train.sharded import consolidate, sharded_checkpoint

    scratch = Path(tempfile.mkdtemp(prefix="lmforge-model-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    if Path(args.model).exists() and sharded_checkpoint(args.model):
        directory = consolidate(args.model, scratch / "consolidated")
    else:
        directory = resolve_model(args.model)
    if is_model_dir(directory) and isinstance(read_config(directory), Seq2SeqConfig):
        raise ConfigError(f"{args.model} is an encoder-decoder (seq2seq) model; {args.command} "
                          "works on decoder-only models for now")
    if not args.adapter and not is_adapter_dir(directory):
        return directory
    if not args.adapter:
        return merge(directory, scratch / "model")
    return merge(args.adapter, scratch / "model", base=directory)


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "lmforge":
        from lmforge.api import consolidate

        print(consolidate(args.model, args.out))
        return
    directory = _model_dir(args)
    if args.format == "hf":
        from lmforge.interop.hf import export_hf

        print(export_hf(directory, args.out))
    else:
        from lmforge.interop.gguf import export_gguf

        print(export_gguf(directory, args.out, dtype=args.gguf_dtype))


def cmd_quantize(args: argparse.Namespace) -> None:
    import time

    from lmforge.compress.calib import Calibration
    from lmforge.compress.quant import QuantSpec
    from lmforge.compress.run import quantize_dir
    from lmforge.modeldir import directory_bytes

    group_size = 32 if args.bits != 8 and args.group_size is None else args.group_size
    spec = QuantSpec(args.bits, group_size, head_bits=args.head_bits, method=args.method,
                     symmetric=args.symmetric)
    calibration = args.calib and Calibration(args.calib, args.calib_samples, args.calib_length,
                                             args.seed)
    source = _model_dir(args)
    start = time.perf_counter()
    out = quantize_dir(source, args.out, spec, calibration)
    seconds = time.perf_counter() - start
    before, after = directory_bytes(source), directory_bytes(out)
    print(f"{spec.describe()} model in {out} ({seconds:.1f} s)")
    print(f"size on disk: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({after / before:.2f}x)")


def cmd_prune(args: argparse.Namespace) -> None:
    import time
    from collections import defaultdict

    from lmforge.compress.calib import Calibration
    from lmforge.compress.prune import PruneSpec
    from lmforge.compress.run import prune_dir

    pattern = args.pattern and PruneSpec.parse_pattern(args.pattern)
    sparsity = None if pattern else (0.5 if args.sparsity is None else args.sparsity)
    spec = PruneSpec(args.method, sparsity, pattern)
    calibration = args.calib and Calibration(args.calib, args.calib_samples, args.calib_length,
                                             args.seed)
    start = time.perf_counter()
    layers = prune_dir(_model_dir(args), args.out, spec, calibration)
    seconds = time.perf_counter() - start
    by_kind = defaultdict(list)
    for name, share in layers.items():
        by_kind[name.rsplit(".", 1)[-1]].append(share)
    print(f"{spec.describe()} model in {args.out} ({seconds:.1f} s); zeros per layer "
          "(every layer's in sparsity.json):")
    for kind, shares in by_kind.items():
        print(f"  {kind:<10} {min(shares):.1%} .. {max(shares):.1%} over {len(shares)} layers")


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from lmforge.config import (
        PRESETS,
        SEQ2SEQ_PRESETS,
        VLM_PRESETS,
        ModelConfig,
        preset,
        resolve_seq2seq_config,
        resolve_vlm_config,
    )
    from lmforge.modeldir import is_adapter_dir, read_config
    from lmforge.models import build_model
    from lmforge.open import resolve_model

    directory = None
    if args.model in PRESETS:
        cfg = preset(args.model)
    elif args.model in SEQ2SEQ_PRESETS:
        cfg = resolve_seq2seq_config(args.model)
    elif args.model in VLM_PRESETS:
        cfg = resolve_vlm_config(args.model)
    else:
        directory = resolve_model(args.model)
        cfg = read_config(_weights_dir(directory))
    with torch.device("meta"):
        report = build_model(cfg).flops()
    print(f"model            {args.model}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:<16} {value}")
    print(f"parameters       {report.params:,} ({report.params / 1e6:.1f} M)")
    print(f"  non-embedding  {report.non_embedding_params:,}")
    print(f"FLOPs per token  {report.flops_per_token:,} (training, forward + backward)")
    print(f"                 {report.flops_per_token // 3:,} (inference, forward)")
    if report.extra:
        print(f"{'part':<16} {'parameters':>12}  FLOPs (training, forward + backward)")
    for key, value in report.extra.items():
        if key.endswith("_params"):
            part = key.removesuffix("_params")
            flops, unit = next((v, k.rpartition("_per_")[2]) for k, v in report.extra.items()
                               if k.startswith(f"{part}_flops_per_"))
            print(f"  {part:<14} {value:>12,}  {flops:,} per {unit}")
    if directory is not None and is_adapter_dir(directory):
        print(_adapter_line(directory))
    if isinstance(cfg, ModelConfig):
        _print_memory(cfg, args)


def _print_memory(cfg, args: argparse.Namespace) -> None:
    """Training memory per rank, by what holds it (see lmforge.train.memory)."""
    from lmforge.train.memory import estimate_memory

    kinds = [args.parallel] if args.parallel else ["ddp", "fsdp"]
    context = args.context or cfg.context_length
    estimates = [estimate_memory(cfg, args.world_size, kind, args.batch_size, context,
                                 bf16=args.precision == "bf16",
                                 grad_checkpointing=args.grad_checkpointing) for kind in kinds]
    print(f"training memory per rank (GiB): {args.world_size} rank(s), {args.batch_size} x "
          f"{context} tokens a micro-batch, {args.precision}, AdamW"
          + (", gradient checkpointing" if args.grad_checkpointing else ""))
    print(f"  {'':<26}" + "".join(f"{kind:>10}" for kind in kinds))
    for i, (name, value) in enumerate(estimates[0].rows()):
        print(f"  {name:<26}" + ("" if value is None else
                                 "".join(f"{e.rows()[i][1] / 2**30:>10.2f}" for e in estimates)))


def _adapter_line(directory) -> str:
    """What a LoRA adapter directory adds to its base: rank, layers, parameters."""
    from lmforge.files import load_safetensors
    from lmforge.lora import read_adapter_config
    from lmforge.modeldir import ADAPTER_WEIGHTS

    cfg, _ = read_adapter_config(directory)
    params = sum(t.numel() for t in load_safetensors(directory / ADAPTER_WEIGHTS).values())
    return (f"LoRA adapter     rank {cfg.rank} (alpha {cfg.alpha:g}) on "
            f"{', '.join(cfg.targets)}: {params:,} parameters")


def _weights_dir(directory):
    """An adapter's base model directory; any other model directory as it is."""
    from lmforge.modeldir import is_adapter_dir
    from lmforge.open import adapter_base

    return adapter_base(directory) if is_adapter_dir(directory) else directory


def cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.errors import ConfigError

    if (args.task is None) == (args.harness is None):
        raise ConfigError("say what to evaluate: --task perplexity|multiple-choice|generation "
                          "with --data FILE, or --harness TASKS (lm-evaluation-harness)")
    if args.harness:
        from lmforge.eval.harness import format_harness, run_harness, write_harness

        results = run_harness(args.model, args.harness.split(","), args.include_path,
                              args.limit, args.num_fewshot, args.batch_size, args.device,
                              args.dtype, args.adapter, args.chat, args.log_samples)
        print(format_harness(results))
        if args.out:
            print(f"results: {write_harness(args.out, results)}")
        return
    if not args.data:
        raise ConfigError(f"--task {args.task} needs --data FILE")
    from lmforge.eval import evaluate_choice, evaluate_generation, evaluate_perplexity
    from lmforge.eval.data import read_choice_examples, read_generation_examples, read_text
    from lmforge.eval.results import format_table, write_results

    # The data is read first: a bad line is reported before a large model loads.
    if args.task == "perplexity":
        data = read_text(args.data, args.max_chars)
    elif args.task == "multiple-choice":
        data = read_choice_examples(args.data, args.context_field, args.choices_field,
                                    args.answer_field, args.limit)
    else:
        data = read_generation_examples(args.data, args.prompt_field, args.answer_field,
                                        args.limit)
    opened = _language_model(args.model, args)
    model, tokenizer, progress = opened.model, opened.tokenizer, not args.quiet
    if args.task == "perplexity":
        result = evaluate_perplexity(model, tokenizer, data, args.window, args.stride,
                                     args.batch_size, progress)
    elif args.task == "multiple-choice":
        result = evaluate_choice(model, tokenizer, data, _unescape(args.delimiter),
                                 args.batch_size, progress)
    else:
        result = evaluate_generation(
            model, tokenizer, data, args.max_new_tokens, [_unescape(s) for s in args.stop],
            opened.stop_ids, args.chat, args.regex, args.ignore_case, args.batch_size, progress,
            opened.processor)
    print(format_table([result]))
    if args.out:
        config = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
        path = write_results(args.out, [result], args.model, config, args.log_samples)
        print(f"results: {path}")


def _unescape(text: str) -> str:
    """Newlines and tabs typed as \\n and \\t, which a shell argument cannot easily hold."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_plot(args: argparse.Namespace) -> None:
    from lmforge.train.plot import plot_run

    print(plot_run(args.run, args.out))


# ------------------------------------------------------------------------------ arguments


def _number(kind: type, low: float | None = None, high: float | None = None,
            low_open: bool = False, what: str = "") -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` within [low, high] ((low, high] if low_open)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if value != value or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


COUNT = _number(int, 1, what=">= 1")  # something there must be at least one of
AMOUNT = _number(int, 0, what=">= 0")
POSITIVE = _number(float, 0, low_open=True, what="> 0")
NON_NEGATIVE = _number(float, 0, what=">= 0")
PROBABILITY = _number(float, 0, 1, low_open=True, what="in (0, 1]")
FRACTION = _number(float, 0, 1, what="in [0, 1]")


class _Formatter(argparse.HelpFormatter):
    """Help that shows every option's default (argparse's own formatter shows only those
    with help text, and says "None" for the unset ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, [], argparse.SUPPRESS)
                and "default" not in text and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """One-line errors that name the command and point at its --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def add_argument(self, *args, **kwargs):
        # Every option gets a help line, so --help shows its default.
        if args and args[0].startswith("-") and not kwargs.get("help"):
            raise ValueError(f"{args[0]} needs a help text")
        return super().add_argument(*args, **kwargs)


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", metavar="FILE", help="calibration text: a text file, JSONL "
                   "(its text field) or a prepared corpus folder")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-length", type=int, default=512, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="where the windows start")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmforge", description="Make your own Transformer language models: "
                     "prepare, train, fine-tune, generate, chat, serve, evaluate, export.",
                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    p = command("quickstart", "corpus -> tokenizer -> small model -> samples, in minutes",
                cmd_quickstart)
    p.add_argument("--data", help="your own text file/folder/JSONL instead of Shakespeare")
    p.add_argument("--resume", action="store_true", help="continue runs/quickstart")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. max_steps=300")

    p = command("prepare", "text files / folders / JSONL / parquet -> token shards", cmd_prepare)
    p.add_argument("inputs", nargs="+", help="files or folders")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default="bpe", help="bpe | char | path to tokenizer.json")
    p.add_argument("--vocab-size", type=_number(int, 1, 2**31 - 1, what="between 1 and 2^31"),
                   default=8192, help="tokens in a trained BPE vocabulary")
    p.add_argument("--text-field", default="text", help="JSONL/parquet field with the text")
    p.add_argument("--val-fraction", type=_number(float, 0, 1, what="in [0, 1)"), default=0.1,
                   help="share of the documents held out for validation")
    p.add_argument("--workers", type=AMOUNT, default=0, help="processes; 0 = all cores")

    p = command("train", "pretrain from a YAML recipe with key=value overrides", cmd_train)
    p.add_argument("recipe", nargs="?", help="YAML recipe (see configs/); optional")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. lr=3e-4 model.n_layer=6")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's last checkpoint")

    p = command("finetune", "chat SFT or classification on your data, LoRA or full",
                cmd_finetune)
    p.add_argument("model", help="base model (any way of naming one, see `lmforge list`)")
    p.add_argument("--data", required=True, help="sft: JSONL of {\"messages\": [...]} or "
                   "{\"prompt\", \"completion\"}; classify: CSV or JSONL with text and label")
    p.add_argument("--task", choices=["sft", "classify"], default=None, help="default sft")
    p.add_argument("--val-data", default=None, help="validation file (default: a share of --data)")
    p.add_argument("--out", default=None, help="run directory (default runs/finetune-DATA)")
    p.add_argument("--recipe", default=None, help="YAML recipe with any training keys")
    p.add_argument("--epochs", type=POSITIVE, default=None,
                   help="passes over the data (default 1)")
    p.add_argument("--max-steps", type=COUNT, default=None, help="optimizer steps instead of epochs")
    p.add_argument("--lr", type=POSITIVE, default=None,
                   help="default 2e-4 (LoRA), 2e-5 (--full)")
    p.add_argument("--batch-size", type=COUNT, default=None, help="examples per step (default 8)")
    p.add_argument("--context-length", type=_number(int, 2, what=">= 2"), default=None,
                   help="longest example in tokens (default: the model's context)")
    p.add_argument("--full", action="store_true", help="train every weight instead of LoRA")
    p.add_argument("--lora-rank", type=COUNT, default=None, help="default 16")
    p.add_argument("--lora-alpha", type=POSITIVE, default=None, help="default 32")
    p.add_argument("--lora-dropout", type=_number(float, 0, 1, what="in [0, 1)"), default=None,
                   help="default 0")
    p.add_argument("--lora-targets", default=None,
                   help="layers to adapt: all-linear (default) or e.g. q_proj,v_proj")
    p.add_argument("--packing", action="store_true", help="sft: several short examples per row")
    p.add_argument("--truncate", action="store_true",
                   help="sft: cut conversations longer than the context (default: skip them)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% slower")
    p.add_argument("--text-field", default=None, help="classify: text column (default text)")
    p.add_argument("--label-field", default=None, help="classify: label column (default label)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("overrides", nargs="*", help="key=value training overrides, e.g. warmup_steps=20")

    model_help = ("model directory, run directory, Hugging Face directory, .gguf file, "
                  "registry name (see `lmforge list`) or hf:ORG/NAME")

    def device_flags(p: argparse.ArgumentParser, adapter: bool = True) -> None:
        if adapter:
            choice = p.add_mutually_exclusive_group()
            choice.add_argument("--adapter", default=None, metavar="DIR",
                                help="put this LoRA adapter (adapter or run directory) on the "
                                "model")
            choice.add_argument("--no-adapter", dest="adapter", action="store_const",
                                const=False, help="leave off the LoRA adapter MODEL holds (an "
                                "adapter or LoRA run directory): its base model alone")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: a GPU "
                       "if there is one)")
        p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                       help="weights and activations (default: bf16 on a GPU, fp32 on a CPU)")

    def sampling_flags(p: argparse.ArgumentParser, shown: bool = True) -> None:
        """Sampling settings; unset ones take the shared defaults (shown in --help)."""

        def default(value):
            return f" (default: {value})" if shown else ""

        p.add_argument("--temperature", type=NON_NEGATIVE, default=None,
                       help="0 = greedy" + default(SAMPLING.temperature))
        p.add_argument("--top-k", type=COUNT, default=None,
                       help="keep the k most likely tokens" + default(SAMPLING.top_k or "off"))
        p.add_argument("--top-p", type=PROBABILITY, default=None,
                       help="keep the most likely tokens up to this probability"
                       + default(SAMPLING.top_p))
        p.add_argument("--min-p", type=FRACTION, default=None,
                       help="drop tokens below this fraction of the top token's probability"
                       + default(SAMPLING.min_p or "off"))
        p.add_argument("--repetition-penalty", type=POSITIVE, default=None,
                       help="> 1 avoids repeats" + default(SAMPLING.repetition_penalty))

    p = command("translate", "source text -> target text with an encoder-decoder model",
                cmd_translate)
    p.add_argument("model", help="a seq2seq model or run directory")
    p.add_argument("--text", action="append", default=[], help="a sentence (repeatable)")
    p.add_argument("--file", default=None, help="one sentence per line")
    p.add_argument("--out", default=None, help="write the translations here, one per line")
    p.add_argument("--beam", type=COUNT, default=4, help="beam width (1: sample, or greedy "
                   "with --temperature 0)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam scores are log-probability / length ** this")
    sampling_flags(p)
    p.add_argument("--seed", type=AMOUNT, default=None, help="repeatable sampling")
    p.add_argument("--max-new-tokens", type=COUNT, default=128, help="longest translation")
    device_flags(p, adapter=False)

    p = command("merge", "fold a LoRA adapter into its base: a plain model directory",
                cmd_merge)
    p.add_argument("adapter_dir", help="adapter directory, or a LoRA fine-tuning run directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--base", default=None,
                   help="base model (default: the one the adapter names)")

    p = command("predict", "label probabilities from a fine-tuned classifier", cmd_predict)
    p.add_argument("model", help="classifier run, model or adapter directory")
    p.add_argument("--text", action="append", default=[], help="text to classify (repeatable)")
    p.add_argument("--file", default=None, help="one text per line")
    p.add_argument("--device", default=None, help="cpu, cuda... (default: a GPU if there is one)")

    p = command("generate", "sample a continuation of a prompt (streaming)", cmd_generate)
    p.add_argument("model", help=model_help)
    p.add_argument("--prompt", default="", help="text to continue (default: from the start)")
    p.add_argument("--max-new-tokens", type=AMOUNT, default=MAX_NEW_TOKENS,
                   help="most tokens to write")
    sampling_flags(p)
    p.add_argument("--seed", type=AMOUNT, default=None, help="the same seed, the same text")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text just before TEXT (repeatable)")
    p.add_argument("--speculative", action="store_true",
                   help=f"draft up to {SPECULATIVE_DRAFT} tokens a step by copying from the "
                        "text so far and check them in one pass: faster when the output "
                        "repeats the input; greedy output is unchanged")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image before the prompt, for a vision-language model (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user message, through the model's chat template; "
                   "prints the answer")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", default=None, metavar="FILE",
                       help="the output is JSON that validates against this JSON schema")
    shape.add_argument("--regex", default=None, metavar="EXPR",
                       help="the output matches this regular expression")
    shape.add_argument("--grammar", default=None, metavar="FILE",
                       help="the output follows this grammar: Lark (llguidance's dialect) or GBNF")
    device_flags(p)

    p = command("embed", "text embeddings: one text a line in, a .npy of unit vectors out",
                cmd_embed)
    p.add_argument("model", help=model_help)
    p.add_argument("--file", required=True, help="texts, one a line")
    p.add_argument("--out", default=None, help="the .npy file (default: FILE with .npy)")
    p.add_argument("--batch-size", type=AMOUNT, default=16, help="texts a forward pass")
    device_flags(p)

    p = command("chat", "talk to a model in the terminal (its chat template)", cmd_chat)
    p.add_argument("model", help=model_help)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=AMOUNT, default=MAX_NEW_TOKENS,
                   help="longest answer in tokens")
    sampling_flags(p)
    device_flags(p)

    p = command("serve", "OpenAI-compatible HTTP API and web chat page", cmd_serve)
    p.add_argument("model", help=model_help)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_number(int, 0, 65535, what="a port, 0-65535"), default=8000,
                   help="port to listen on")
    p.add_argument("--name", default=None, help="model name in the API (default: from MODEL)")
    p.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default $LMFORGE_API_KEY)")
    p.add_argument("--max-batch", type=COUNT, default=8, help="sequences decoding together")
    p.add_argument("--max-queue", type=AMOUNT, default=64,
                   help="waiting requests before new ones get 429")
    p.add_argument("--max-len", type=_number(int, 2, what=">= 2"), default=None,
                   help="positions per sequence, prompt and answer (default: the model's "
                        "context); the KV cache holds max-batch x max-len from the start")
    p.add_argument("--timeout", type=POSITIVE, default=600.0, help="seconds per request")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (slow start, faster decoding)")
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="auto",
                   help="the KV cache's number type: float16 or bfloat16 hold half the bytes "
                        "of float32 (more sequences and positions in memory; decoding many "
                        "sequences at once reads less), rounding the keys and values; model: "
                        "the model's own; auto (default): the model's own, float16 for int8 "
                        "or int4 weights, as llama.cpp keeps it")
    p.add_argument("--speculative", action="store_true",
                   help=f"each sequence drafts up to {SPECULATIVE_DRAFT} tokens a step by copying "
                        "from its text and the model checks them in the same pass: faster "
                        "when answers repeat their prompts (decode steps then run eagerly)")
    p.add_argument("--prefill-chunk", type=AMOUNT, default=PREFILL_CHUNK,
                   help="prompt tokens read in one step; a longer prompt is read over several "
                        "steps so that the answers already streaming do not stall (0: whole)")
    p.add_argument("--max-body-mb", type=_number(float, 0, 1024, low_open=True,
                                                 what="in (0, 1024]"), default=None,
                   help="largest request body in MiB (default: 1, or 20 for a model that reads "
                        "images); also the largest image downloaded with --allow-image-urls")
    p.add_argument("--max-images", type=AMOUNT, default=8,
                   help="images one chat request may hold (a vision-language model)")
    p.add_argument("--max-image-pixels", type=COUNT, default=4096 * 4096,
                   help="pixels an image may have, read from its header before it is decoded")
    p.add_argument("--allow-image-urls", action="store_true",
                   help="download http(s) image URLs that clients send (the server then "
                        "fetches any address a client names: for trusted clients only)")
    device_flags(p)
    p.add_argument("--log-level", default="info", help="uvicorn's logging",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])

    p = command("pull", "fetch a model into the cache (~/.cache/lmforge/models)", cmd_pull)
    p.add_argument("name", help="registry name (see `lmforge list`) or hf:ORG/NAME")

    command("list", "models in the cache, and the registry's names", cmd_list)

    p = command("export", "write a model as a Hugging Face directory or a GGUF file, or "
                "consolidate a sharded checkpoint", cmd_export)
    p.add_argument("model", help=model_help)
    p.add_argument("--format", choices=["hf", "gguf", "lmforge"], required=True,
                   help="a Hugging Face directory, a GGUF file, or (for a run trained with "
                   "parallel=fsdp) an lmforge model directory made of its sharded checkpoint")
    p.add_argument("--out", required=True, help="output directory (hf, lmforge) or .gguf path")
    p.add_argument("--dtype", dest="gguf_dtype", choices=["f32", "f16", "q8_0"], default="f32",
                   help="gguf only: the 2-D weights' type; a quantized model keeps its own "
                   "(int8 as Q8_0, int4/int3 as Q4_0 if symmetric, else Q4_1)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="fold this LoRA adapter in first")

    p = command("quantize", "int8, int4 or int3 weights: a smaller, faster model directory",
                cmd_quantize)
    p.add_argument("model", help=model_help)
    p.add_argument("--bits", type=int, choices=[8, 4, 3], required=True, help="bits per weight")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None,
                   help="int4 and int3: columns sharing a scale (default 32)")
    p.add_argument("--method", choices=["rtn", "gptq", "awq", "awq+gptq"], default="rtn",
                   help="rtn: round to nearest; gptq: round column by column, correcting the "
                   "error on calibration text; awq: scale the weights that meet large inputs "
                   "up first (calibrated too), then round to nearest; awq+gptq: both. The "
                   "calibrated methods need --calib")
    p.add_argument("--symmetric", action="store_true", help="int4 and int3: grids centred on "
                   "0 (no zero points), as GGUF's Q4_0 stores them")
    p.add_argument("--head-bits", type=int, choices=[8, 4, 3], default=8,
                   help="the output projection's bits: 8 (the default) or --bits. It is the "
                   "layer most sensitive to rounding (SmolLM2 int4: +5%% perplexity for it "
                   "alone), and the largest of a model with a large vocabulary (Gemma 3's)")
    _calibration_arguments(p)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--adapter", default=None, metavar="DIR", help="fold this LoRA adapter in first")

    p = command("prune", "zero a share of the weights: magnitude, Wanda or SparseGPT",
                cmd_prune)
    p.add_argument("model", help=model_help)
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], required=True,
                   help="magnitude: the smallest weights; wanda: weight x input norm; "
                   "sparsegpt: the cheapest to remove, the rest updated to make up (both "
                   "need --calib)")
    share = p.add_mutually_exclusive_group()
    share.add_argument("--sparsity", type=float, default=None,
                       help="the fraction of each layer's weights set to zero (default 0.5)")
    share.add_argument("--pattern", default=None, metavar="N:M",
                       help="N of every M consecutive weights zero, e.g. 2:4")
    _calibration_arguments(p)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--adapter", default=None, metavar="DIR", help="fold this LoRA adapter in first")

    p = command("info", "parameters, FLOPs per token and training memory per rank of a model "
                "or preset", cmd_info)
    p.add_argument("model", help="preset name, or " + model_help)
    p.add_argument("--world-size", type=COUNT, default=1, help="ranks training together "
                   "(for the memory estimate)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default=None,
                   help="the memory estimate for one kind only (default: both)")
    p.add_argument("--batch-size", type=COUNT, default=1, help="sequences per micro-batch")
    p.add_argument("--context", type=COUNT, default=None, help="tokens per sequence "
                   "(default: the model's context length)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: computed in bf16, weights and optimizer state in fp32 (GPUs)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward")

    p = command("eval", "score a model: perplexity, multiple choice, generation, "
                "lm-evaluation-harness tasks", cmd_eval)
    p.add_argument("model", help=model_help)
    p.add_argument("--task", choices=["perplexity", "multiple-choice", "generation"],
                   help="perplexity of a text file, or JSONL examples (see --data)")
    p.add_argument("--data", help="perplexity: a UTF-8 text file; multiple-choice: JSONL with "
                   "context, choices, answer (index); generation: JSONL with prompt, answer")
    p.add_argument("--harness", metavar="TASKS", help="lm-evaluation-harness tasks instead, "
                   "comma-separated, e.g. hellaswag,arc_easy (pip install lm-eval)")
    p.add_argument("--include-path", default=None, help="harness: a folder of task YAMLs")
    p.add_argument("--num-fewshot", type=AMOUNT, default=None,
                   help="harness: examples in prompts")
    p.add_argument("--limit", type=COUNT, default=None, help="score only the first N examples")
    p.add_argument("--window", type=_number(int, 2, what=">= 2"), default=None,
                   help="perplexity: tokens per forward pass (default: the model's context, at "
                   f"most {PERPLEXITY_WINDOW}); a window's logits take window x vocabulary floats, "
                   "e.g. 200 MB for SmolLM2-135M at 1024, and windows are batched up to 512 MB")
    p.add_argument("--stride", type=COUNT, default=None, help="perplexity: tokens between "
                   "window starts (default: window - 1; less gives each token more context)")
    p.add_argument("--max-chars", type=COUNT, default=None,
                   help="perplexity: the file's first N characters")
    p.add_argument("--context-field", default="context", help="multiple-choice: JSONL field")
    p.add_argument("--choices-field", default="choices", help="multiple-choice: JSONL field")
    p.add_argument("--answer-field", default="answer", help="JSONL field with the answer")
    p.add_argument("--prompt-field", default="prompt", help="generation: JSONL field")
    p.add_argument("--delimiter", default=" ", help="multiple-choice: text between context and "
                   "choice (lm-eval's target_delimiter; \\n for a newline; default: a space)")
    p.add_argument("--chat", action="store_true",
                   help="generation and harness: prompts go through the chat template")
    p.add_argument("--max-new-tokens", type=COUNT, default=64, help="generation")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="generation: end "
                   "the output before TEXT (repeatable; \\n for a newline)")
    p.add_argument("--regex", default=None, help="generation: compare the first match's first "
                   "group (or whole match) with the answer, e.g. 'answer is (\\d+)'")
    p.add_argument("--ignore-case", action="store_true", help="generation: case-blind match")
    p.add_argument("--batch-size", type=COUNT, default=8, help="sequences per forward pass")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--log-samples", action="store_true",
                   help="with --out: every example's scores and outputs too")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    device_flags(p)

    p = command("plot", "draw a run's loss curve to PNG", cmd_plot)
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="PNG path (default RUN/loss.png)")
    return parser


def _misspelt_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """An error for a first argument that is no command, with the closest one."""
    if not argv or argv[0].startswith("-"):
        return None
    commands = _commands(parser)
    if argv[0] in commands.choices:
        return None
    match = difflib.get_close_matches(argv[0], list(commands.choices), n=1)
    hint = f"did you mean `lmforge {match[0]}`?" if match else "see `lmforge --help`"
    return f"lmforge: error: no command {argv[0]!r}: {hint}\n"


def _command_parser(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command `args` are for (the top one where there is none)."""
    return _commands(parser).choices.get(getattr(args, "command", None), parser)


def _commands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """An error for arguments `parser` does not take, with the closest option of each
    misspelt one (`--max-tokens`: did you mean --max-new-tokens?)."""
    options = [o for action in parser._actions for o in action.option_strings]
    hints = []
    for arg in extra:
        name = arg.split("=", 1)[0]
        match = difflib.get_close_matches(name, options, n=1) if name.startswith("-") else []
        if match:
            hints.append(f"{name}: did you mean {match[0]}?")
    return f"unrecognized arguments: {' '.join(extra)}" + "".join(f"; {h}" for h in hints)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    misspelt = _misspelt_command(parser, argv)
    if misspelt:
        sys.stderr.write(misspelt)
        return 2
    try:  # argparse exits on --help and on a bad argument: here that is a return code
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may come after options too (argparse only takes them before).
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                        for e in extra):
            args.overrides = [*args.overrides, *extra]
        elif extra:
            command = _command_parser(parser, args)
            command.error(_unrecognized(command, extra))
    except SystemExit as stopped:
        return stopped.code
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
