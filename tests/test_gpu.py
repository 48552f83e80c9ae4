"""What only a CUDA GPU can check: bf16 training, CUDA-graph decoding, int weights on the GPU,
FSDP2 with a mixed-precision policy and NCCL. Marked `gpu`, so the suite leaves them out;
`benchmarks/gpu_check.sh` runs them (`pytest -m gpu tests/test_gpu.py`) on a GPU machine.
`LMFORGE_TEST_DEVICE=cpu` runs their logic on a CPU, to check them before a GPU is lent.
"""

import copy
import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from lmforge.compress.quant import QuantLinear, QuantSpec, quantize
from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingConfig
from lmforge.train.config import load_recipe
from lmforge.train.trainer import Trainer

pytestmark = pytest.mark.gpu

DEVICE = torch.device(os.environ.get("LMFORGE_TEST_DEVICE", "cuda"))
GREEDY = SamplingConfig(temperature=0)
TINY = {"preset": "shakespeare-char", "n_layer": 2, "d_model": 64, "context_length": 64}


@pytest.fixture(autouse=True)
def _device():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("no CUDA GPU: run these with benchmarks/gpu_check.sh on a GPU machine "
                    "(or LMFORGE_TEST_DEVICE=cpu to check their logic)")


def losses(run) -> list[float]:
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").open())
            if "train_loss" in r]


def test_bf16_training_follows_fp32(char_corpus, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        values = dict(data=str(char_corpus), out_dir=str(tmp_path / precision), model=TINY,
                      batch_size=8, max_steps=60, warmup_steps=5, lr=3e-3, eval_interval=0,
                      log_interval=1, progress=False, sample_tokens=0,
                      precision=precision, device=DEVICE.type)
        Trainer(load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])).fit()
        runs[precision] = losses(tmp_path / precision)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert abs(bf16[0] - fp32[0]) < 0.02
    assert bf16[-1] < bf16[0] - 1.0
    assert abs(bf16[-1] - fp32[-1]) < 0.1


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama(300, 128).to(DEVICE)


def requests() -> list[Request]:
    g = torch.Generator().manual_seed(0)
    return [Request(torch.randint(0, 300, (n,), generator=g).tolist(), 24, GREEDY)
            for n in (5, 11, 3)]


def test_cuda_graph_decoding_equals_eager(model):
    eager = Engine(model, None, max_batch=2, max_len=64).run(requests())
    compiled = Engine(model, None, max_batch=2, max_len=64, compile=True).run(requests())
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]


@pytest.mark.parametrize("bits", [8, 4])
def test_int_weights_on_the_gpu_equal_the_dequantized_product(bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = QuantLinear.from_linear(linear, bits, None if bits == 8 else 32)
    x = torch.randn(3, 7, 256)
    on_cpu = layer(x)  # the CPU's int kernels
    layer = layer.to(DEVICE)
    expected = F.linear(x.to(DEVICE), layer.dequantized_weight(), layer.bias)
    # On a GPU the layer is that product; a CPU's int kernels round their inputs first.
    tolerance = 1e-5 if DEVICE.type == "cuda" else 1e-2
    torch.testing.assert_close(layer(x.to(DEVICE)), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(layer(x.to(DEVICE)).cpu(), on_cpu, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_model_decodes_on_the_gpu(model, bits):
    quantized = quantize(copy.deepcopy(model), QuantSpec(bits, None if bits == 8 else 32))
    tokens = [c.tokens for c in Engine(quantized, None, max_batch=2, max_len=64).run(requests())]
    assert all(len(t) == 24 for t in tokens)
    reference = quantize(copy.deepcopy(model).cpu(), QuantSpec(bits, None if bits == 8 else 32))
    on_cpu = [c.tokens for c in Engine(reference, None, max_batch=2, max_len=64).run(requests())]
    same = sum(a == b for t, u in zip(tokens, on_cpu) for a, b in zip(t, u))
    assert same >= 0.9 * sum(map(len, tokens))  # kernels round differently, rarely a token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offload", [False, True], ids=["on-gpu", "cpu-offload"])
def test_fsdp2_on_one_gpu_trains_like_autocast(tiny_llama, tmp_path, monkeypatch, offload):
    """One rank of NCCL: the bf16 parameter policy, fp32 gradient reduction, optionally the
    state in host memory, and a sharded checkpoint written and read back."""
    if offload and DEVICE.type != "cuda":
        pytest.skip("offloading is from a GPU")
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from lmforge.train.distributed import shard_model
    from lmforge.train.sharded import load_sharded, training_state

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                           WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    try:
        reference = tiny_llama(300, 128).to(DEVICE).train()
        sharded = copy.deepcopy(reference)
        shard_model(sharded, DEVICE, bf16=True, offload=offload)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (reference, sharded)]
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            x = torch.randint(0, 300, (4, 33), generator=g).to(DEVICE)
            step = []
            for m, opt, autocast in ((reference, optimizers[0], True),
                                     (sharded, optimizers[1], False)):
                with torch.autocast(DEVICE.type, torch.bfloat16, enabled=autocast):
                    logits = m(x[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()
                step.append(loss.item())
            assert abs(step[0] - step[1]) < 0.05 * step[0], step
        dcp.save(training_state(sharded, optimizers[1]), checkpoint_id=tmp_path / "shards")
        (tmp_path / "trainer.json").write_text(json.dumps({"step": 10}))
        torch.save({"torch": torch.get_rng_state()}, tmp_path / "rng-0.pt")
        restored = copy.deepcopy(reference)
        shard_model(restored, DEVICE, bf16=True, offload=offload)
        optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-3)
        load_sharded(tmp_path, restored, optimizer, 0)
        for a, b in zip(restored.parameters(), sharded.parameters()):
            assert torch.equal(a.full_tensor(), b.full_tensor())
    finally:
        dist.destroy_process_group()
