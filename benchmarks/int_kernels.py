"""lmforge's int8 and int4 CPU kernels against PyTorch's, on SmolLM2-135M's layer shapes.

    python benchmarks/int_kernels.py              # 1 and 8 rows, 30 copies of each layer
    python benchmarks/int_kernels.py --copies 1   # one copy: the weights stay in the cache

Each shape is the product a decoding step makes (q, k and v together; gate and up together;
o; down; the int8 output projection), timed over `--copies` copies of the layer called in
turn, as a step goes through a model's layers, so that the weights come from memory rather
than the cache as they do in a model. lmforge's kernels round the activations to int8 and
multiply on integer instructions (`lmforge/compress/decode_kernels.cpp`); PyTorch's
(`torch._weight_int4pack_mm_for_cpu`, `torch._weight_int8pack_mm`) multiply bfloat16
activations, and are what lmforge decodes with where its own kernels cannot be built.
Microseconds per call, best of --repeats, 2 threads; the ratio is PyTorch's time over lmforge's.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lmforge.compress import kernels
from lmforge.compress.quant import (
    SCALE_DTYPE,
    Operands,
    QuantLinear,
    _aligned,
    _int4_kernel_operands,
    kernel_matmul,
    kernel_operands,
)

# (name, out_features, in_features, bits): SmolLM2-135M's products in a decoding step
SHAPES = [("q, k, v", 960, 576, 4), ("o", 576, 576, 4), ("gate, up", 3072, 576, 4),
          ("down", 576, 1536, 4), ("output (int8)", 49152, 576, 8)]


def pytorch_operands(layer: QuantLinear) -> Operands:
    """The layer's weights as PyTorch's int kernels take them."""
    if layer.bits == 8:
        return Operands(False, (_aligned(layer.weight), _aligned(layer.scales.to(SCALE_DTYPE))))
    return Operands(False, _int4_kernel_operands(layer.weight, layer.scales, layer.zeros,
                                                 layer.group_size))


def time_calls(layers: list[tuple[QuantLinear, Operands]], rows: int, repeats: int) -> float:
    """Microseconds per call, each layer called once a pass, best of `repeats` passes."""
    first = layers[0][0]
    x = torch.randn(rows, first.in_features)
    passes = max(1, 200 // len(layers))

    def run() -> None:
        for layer, operands in layers:
            kernel_matmul(x, operands, layer.bits, layer.group_size, layer.out_features)

    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            run()
        best = min(best, (time.perf_counter() - start) / (passes * len(layers)))
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=30, help="copies of each layer")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("lmforge's int kernels are not available on this machine")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"microseconds per call, {args.copies} copies of each layer, 2 threads\n")
    print("| product | weights | rows | lmforge | PyTorch | PyTorch / lmforge |")
    print("|---|---|---|---|---|---|")
    for name, out_features, in_features, bits in SHAPES:
        copies = 1 if bits == 8 else args.copies  # the output projection is 28 MB alone
        layers = [QuantLinear.from_linear(nn.Linear(in_features, out_features, bias=False),
                                          bits, None if bits == 8 else 32)
                  for _ in range(copies)]
        ours = [(layer, kernel_operands([layer])) for layer in layers]
        theirs = [(layer, pytorch_operands(layer)) for layer in layers]
        for rows in (1, 8):
            a, b = (time_calls(pairs, rows, args.repeats) for pairs in (ours, theirs))
            kind = "int8" if bits == 8 else "int4 g32"
            print(f"| {name} {out_features} x {in_features} | {kind} | {rows} | {a:.1f} | "
                  f"{b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
