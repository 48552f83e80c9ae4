"""float32 matrix products on this CPU: PyTorch's default (MKL) against oneDNN, which lmforge
takes for them (`lmforge.layers.linear`), with their gradients when training.

    python benchmarks/products.py

y = x W^T for SmolLM2-135M's layer shapes and a wider model's, x of 9 to 2,048 rows (a
decoding step of more than 8 sequences, a prompt, a batch being scored); then the product
and its gradients (of x and W) for a training step's rows. GFLOP/s, best of --repeats, the
threads PyTorch uses, and the ratio oneDNN / MKL. A product of up to 8 rows goes through
lmforge's own kernel instead (`kernels.float_matmul`), which this does not time.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from lmforge.layers import linear, onednn_products

# (in_features, out_features): SmolLM2-135M's o, up, down and output projection; a 2048-wide MLP
SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152), (2048, 8192)]
ROWS = (9, 32, 128, 512, 2048)
TRAINING_ROWS = (2048,)  # a batch of 16 x 128 tokens (lmforge quickstart's)


def seconds(fn, repeats: int) -> float:
    """Fewest seconds of `repeats` calls of `fn`, after two to warm up."""
    fn(), fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not onednn_products():
        raise SystemExit("PyTorch here has no oneDNN product for float32 (x86 builds have one)")
    torch.manual_seed(0)
    print(f"float32 GFLOP/s, {torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| rows | in -> out | MKL (F.linear) | oneDNN | oneDNN / MKL |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for k, n in SHAPES:
            w = torch.randn(n, k)
            for m in ROWS:
                if m * n > 512 * 49152:  # the full vocabulary's logits of 512 rows at most
                    continue
                x = torch.randn(m, k)
                mkl = seconds(partial(F.linear, x, w), args.repeats)
                onednn = seconds(partial(torch.ops.mkldnn._linear_pointwise, x, w, None, "none",
                                         [], ""), args.repeats)
                flops = 2 * m * n * k
                print(f"| {m} | {k} -> {n} | {flops / mkl / 1e9:.0f} | {flops / onednn / 1e9:.0f} "
                      f"| {mkl / onednn:.2f}x |")
    print("\nwith the gradients of x and W (3 products)\n")
    print("| rows | in -> out | MKL (F.linear) | oneDNN (lmforge) | oneDNN / MKL |")
    print("|---|---|---|---|---|")
    for k, n in SHAPES[:3] + SHAPES[4:]:
        w = torch.randn(n, k, requires_grad=True)
        for m in TRAINING_ROWS:
            x = torch.randn(m, k, requires_grad=True)
            grad = torch.randn(m, n)
            mkl = seconds(partial(step, F.linear, x, w, grad), max(3, args.repeats // 3))
            onednn = seconds(partial(step, linear, x, w, grad), max(3, args.repeats // 3))
            flops = 3 * 2 * m * n * k
            print(f"| {m} | {k} -> {n} | {flops / mkl / 1e9:.0f} | {flops / onednn / 1e9:.0f} "
                  f"| {mkl / onednn:.2f}x |")


def step(product, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor) -> None:
    """A product and its backward pass (x's and w's gradients)."""
    x.grad = w.grad = None
    product(x, w).backward(grad)


if __name__ == "__main__":
    main()
