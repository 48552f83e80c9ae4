"""Compressing a model directory into another: what `lmforge quantize` and `lmforge prune`
run, for every method."""

from __future__ import annotations

from pathlib import Path

from lmforge.compress.calib import Calibration
from lmforge.compress.prune import PruneSpec, PruningError, prune, save_sparsity
from lmforge.compress.quant import QuantizationError, QuantSpec, decoder_of, quantize
from lmforge.compress.sequential import quantize_calibrated
from lmforge.errors import LmforgeError
from lmforge.modeldir import copy_settings, is_adapter_dir, read_model, read_tokenizer, save_model


def quantize_dir(source: str | Path, out: str | Path, spec: QuantSpec,
                 calibration: Calibration | None = None, progress: bool = True) -> Path:
    """Write model directory `source`, quantized by `spec.method`, as the model directory
    `out`. GPTQ and AWQ need `calibration` text."""
    model, tokenizer = _read_source(source, out, "quantized", QuantizationError)
    if spec.method == "rtn":
        quantize(model, spec)
    else:
        tokens = _calibration_tokens(model, tokenizer, calibration, spec.method)
        quantize_calibrated(model, tokens, spec, progress=progress)
    return _write(source, out, model, tokenizer)


def prune_dir(source: str | Path, out: str | Path, spec: PruneSpec,
              calibration: Calibration | None = None, progress: bool = True
              ) -> dict[str, float]:
    """Write model directory `source`, pruned by `spec`, as the model directory `out` (with
    sparsity.json); each layer's share of zero weights. Wanda and SparseGPT need
    `calibration` text."""
    model, tokenizer = _read_source(source, out, "pruned", PruningError)
    tokens = (None if spec.method == "magnitude" else
              _calibration_tokens(model, tokenizer, calibration, spec.method))
    layers = prune(model, spec, tokens, progress=progress)
    save_sparsity(_write(source, out, model, tokenizer), spec, layers)
    return layers


def _read_source(source: str | Path, out: str | Path, made: str, error: type[LmforgeError]):
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise error(f"{out} is the model's own directory: write the {made} model elsewhere")
    if is_adapter_dir(source):  # its weights alone would lose what the adapter learned
        raise error(f"{source} holds a LoRA adapter: fold it in first "
                    f"(`lmforge merge {source} --out DIR`), then use DIR")
    return read_model(source), read_tokenizer(source)


def _calibration_tokens(model, tokenizer, calibration: Calibration | None, method: str):
    if calibration is None:
        raise QuantizationError(f"{method} chooses weights by the activations of calibration "
                                "text: give some (--calib FILE)")
    context = decoder_of(model).cfg.context_length
    if calibration.length > context:
        raise QuantizationError(f"calibration windows of {calibration.length} tokens are "
                                f"longer than the model's context ({context}): use "
                                f"--calib-length {context} or less")
    return calibration.tokens(tokenizer)


def _write(source: str | Path, out: str | Path, model, tokenizer) -> Path:
    save_model(out, model, tokenizer)
    copy_settings(source, out)
    return Path(out)
