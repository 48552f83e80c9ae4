"""Compressing a model directory into another: what `lmforge quantize` runs, for every
method."""

from __future__ import annotations

from pathlib import Path

from lmforge.compress.calib import Calibration
from lmforge.compress.gptq import gptq_quantize
from lmforge.compress.quant import QuantizationError, QuantSpec, decoder_of, quantize
from lmforge.modeldir import copy_settings, is_adapter_dir, read_model, read_tokenizer, save_model


def quantize_dir(source: str | Path, out: str | Path, spec: QuantSpec,
                 calibration: Calibration | None = None, progress: bool = True) -> Path:
    """Write model directory `source`, quantized by `spec.method`, as the model directory
    `out`. GPTQ and AWQ need `calibration` text."""
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise QuantizationError(f"{out} is the model's own directory: write the quantized "
                                "model elsewhere")
    if is_adapter_dir(source):  # its weights alone would lose what the adapter learned
        raise QuantizationError(f"{source} holds a LoRA adapter: fold it in first "
                                f"(`lmforge merge {source} --out DIR`), then quantize DIR")
    model, tokenizer = read_model(source), read_tokenizer(source)
    if spec.method == "rtn":
        quantize(model, spec)
    else:
        if calibration is None:
            raise QuantizationError(f"{spec.method} chooses the rounding from the activations of "
                                    "calibration text: give some (--calib FILE)")
        context = decoder_of(model).cfg.context_length
        if calibration.length > context:
            raise QuantizationError(f"calibration windows of {calibration.length} tokens are "
                                    f"longer than the model's context ({context}): use "
                                    f"--calib-length {context} or less")
        gptq_quantize(model, calibration.tokens(tokenizer), spec, progress=progress)
    save_model(out, model, tokenizer)
    copy_settings(source, out)
    return out
