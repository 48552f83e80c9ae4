"""GGUF export of quantized model directories: int8 layers as Q8_0 and symmetric int4 ones as
Q4_0 read back exactly, asymmetric int4 and int3 ones as Q4_1 within float16's rounding of
their minimums; the files run in llama.cpp (where llama-cpp-python is installed)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.compress.quant import QuantLinear, QuantSpec, quantize
from lmforge.compress.run import quantize_dir
from lmforge.config import ModelConfig
from lmforge.errors import UnsupportedModel
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.interop.gguf import _gguf_name, export_gguf, import_gguf, read_gguf
from lmforge.modeldir import save_model
from lmforge.models.decoder import Decoder
from lmforge.open import open_model
from lmforge.tokenizer import SpecialTokens, Tokenizer

# Widths 96 and 160 are whole 32-column blocks but not whole groups of 64 or 128: the last
# group of a row is short (64 + 32 columns, 128 + 32, ...).
TINY = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=96, d_mlp=160, context_length=64,
            positions="rope", rope_base=10000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
            init_std=0.1)
# (spec, GGUF type of the blocks' projections, of the output projection, of the file)
CASES = [
    (QuantSpec(8), "Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    (QuantSpec(4, 32, symmetric=True), "Q4_0", "Q8_0", "MOSTLY_Q4_0"),
    (QuantSpec(4, 64, symmetric=True, head_bits=4), "Q4_0", "Q4_0", "MOSTLY_Q4_0"),
    (QuantSpec(4, 32), "Q4_1", "Q8_0", "MOSTLY_Q4_1"),
    (QuantSpec(4, 128), "Q4_1", "Q8_0", "MOSTLY_Q4_1"),
    (QuantSpec(3, 64, head_bits=3), "Q4_1", "Q4_1", "MOSTLY_Q4_1"),
]
EXACT = ("Q8_0", "Q4_0")


@pytest.fixture(scope="module")
def tokenizer(bpe_tokenizer) -> Tokenizer:
    return Tokenizer(bpe_tokenizer.backend,
                     SpecialTokens(bos_token="<|endoftext|>", eos_token="<|im_end|>"))


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**TINY, vocab_size=tokenizer.vocab_size))
    with torch.no_grad():  # norms start at 1; make them count in the comparison
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return save_model(tmp_path_factory.mktemp("float"), model, tokenizer)


def exported(float_dir, tmp_path, spec: QuantSpec):
    """The quantized model (as lmforge runs it) and the GGUF file of its directory."""
    directory = quantize_dir(float_dir, tmp_path / "quantized", spec, progress=False)
    return open_model(directory).model, export_gguf(directory, tmp_path / "model.gguf")


def layers(model: Decoder) -> dict[str, QuantLinear]:
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def per_column(layer: QuantLinear, per_group: torch.Tensor) -> torch.Tensor:
    """(N, groups) -> (N, K): each column's value of its group."""
    return per_group.repeat_interleave(layer.group_size, dim=1)[:, :layer.in_features]


def q4_1_rounding(layer: QuantLinear) -> torch.Tensor:
    """(N, K): how far float16 moves each weight's Q4_1 minimum, m = zero - 8 * scale."""
    m = layer.zeros.float() - 8 * layer.scales.float()
    return per_column(layer, (m.to(torch.float16).float() - m).abs())


def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode("First Citizen:\nBefore we proceed any further, hear me speak.")


@pytest.mark.parametrize("spec, blocks, head, file_type", CASES,
                         ids=[case[0].describe() for case in CASES])
def test_quantized_weights_read_back_as_lmforge_dequantizes_them(float_dir, tmp_path, tokenizer,
                                                                 spec, blocks, head, file_type):
    model, path = exported(float_dir, tmp_path, spec)
    reader = gguf.GGUFReader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {kinds[f"blk.{i}.{name}.weight"] for i in range(2)
            for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                         "ffn_down")} == {blocks}
    # The model is tied: its output projection, quantized, is also its embedding, and
    # llama.cpp reads both from token_embd.
    assert "output.weight" not in kinds and kinds["token_embd.weight"] == head
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert gguf.LlamaFileType(reader.fields["general.file_type"].contents()).name == file_type
    # llama.cpp's name for GPT-2's regex (it refuses "gpt2", the tokenizer model's name).
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"

    cfg, state, _, _ = read_gguf(path)
    assert cfg.tie_embeddings
    # Floats (norms) come back exactly, whatever type held them.
    for name, tensor in model.state_dict().items():
        if name.endswith(".weight") and name not in layers(model):
            assert torch.equal(state[name], tensor), name
    worst = 0.0
    for name, layer in layers(model).items():
        stored = "embed.weight" if name == "lm_head.weight" else name  # tied (above)
        expected, got = layer.dequantized_weight(), state[stored]
        if kinds[_gguf_name(stored)] in EXACT:
            assert torch.equal(got, expected), name
        else:
            error = (got - expected).abs()
            # m's float16 rounding, and one float32 rounding on each side of the comparison.
            assert (error <= q4_1_rounding(layer) + expected.abs() * 2**-23).all(), name
            worst = max(worst, (error / per_column(layer, layer.scales.float())).max().item())
    if blocks == "Q4_1":
        print(f"\n{spec.describe()}: Q4_1 weights within {worst:.2e} of a step of lmforge's")

    imported = open_model(import_gguf(path, tmp_path / "imported")).model
    ids = torch.tensor([prompt(tokenizer)])
    with torch.inference_mode():
        got, expected = imported(ids), model(ids)
    # The same weights. lmforge's int kernels round each layer's input to int8, which moves
    # this random model's logits by about 2% (a wrong norm, rotary or tie: by their size).
    assert (got - expected).norm() / expected.norm() < 0.05


def test_an_untied_embedding_takes_the_smallest_type_that_holds_it_exactly(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    model = quantize(Decoder(cfg), QuantSpec(4, 32))
    path = export_gguf(save_model(tmp_path / "int4", model, tokenizer), tmp_path / "model.gguf")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["token_embd.weight"] == "F32"  # random floats: nothing smaller holds them

    embedding = model.embed.weight.detach().clone()
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    from_q8_0 = gguf.quants.dequantize(gguf.quants.quantize(embedding.numpy(), q8_0), q8_0)
    for values, kind in [(torch.from_numpy(from_q8_0), "Q8_0"),
                         (embedding.bfloat16().float(), "BF16"),
                         (embedding.half().float(), "F16")]:
        with torch.no_grad():
            model.embed.weight.copy_(values)
        directory = save_model(tmp_path / kind, model, tokenizer)
        again = export_gguf(directory, tmp_path / f"{kind}.gguf")
        kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(again).tensors}
        assert kinds["token_embd.weight"] == kind
        assert torch.equal(read_gguf(again)[1]["embed.weight"], values)


def test_a_scale_float16_cannot_hold_writes_that_layer_as_f32_and_says_why(float_dir, tmp_path,
                                                                           tokenizer):
    model = quantize(open_model(float_dir).model, QuantSpec(8))
    layer = model.blocks[0].mlp.down_proj
    with torch.no_grad():  # a row of tiny weights: its scale is far below float16's range
        layer.scales[3] = 1e-9
    directory = save_model(tmp_path / "tiny-row", model, tokenizer)
    with pytest.warns(UserWarning, match=r"blocks\.0\.mlp\.down_proj\.weight \(blk\.0\.ffn_down"
                                         r"\.weight\) is written as F32.*5 of its 480 blocks"):
        path = export_gguf(directory, tmp_path / "model.gguf")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.ffn_down.weight"] == "F32" and kinds["blk.0.ffn_up.weight"] == "Q8_0"
    assert torch.equal(read_gguf(path)[1]["blocks.0.mlp.down_proj.weight"],
                       layer.dequantized_weight())


def test_a_width_that_is_not_whole_blocks_is_refused_naming_the_layer(tmp_path, tokenizer):
    cfg = ModelConfig(**{**TINY, "d_model": 48}, vocab_size=tokenizer.vocab_size)
    model = quantize(Decoder(cfg), QuantSpec(8))
    directory = save_model(tmp_path / "narrow", model, tokenizer)
    with pytest.raises(UnsupportedModel, match=r"blocks\.0\.attn\.q_proj\.weight "
                                               r"\(blk\.0\.attn_q\.weight\) has 48 input features, "
                                               r"not a multiple of 32"):
        export_gguf(directory, tmp_path / "model.gguf")
    assert not list(tmp_path.glob("model.gguf*"))


def test_a_float_dtype_for_a_quantized_model_is_refused(float_dir, tmp_path):
    directory = quantize_dir(float_dir, tmp_path / "int8", QuantSpec(8), progress=False)
    with pytest.raises(UnsupportedModel, match="int8 weights.*would round them a second time"):
        export_gguf(directory, tmp_path / "model.gguf", dtype="f16")


def test_cli_exports_a_quantized_directory(float_dir, tmp_path, capsys):
    directory = quantize_dir(float_dir, tmp_path / "int4", QuantSpec(4, 32), progress=False)
    out = tmp_path / "model.gguf"
    assert main(["export", str(directory), "--format", "gguf", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out


# --------------------------------------------------------------------------- llama.cpp


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32, symmetric=True),
                                  QuantSpec(4, 64)], ids=QuantSpec.describe)
def test_llama_cpp_runs_the_export_as_lmforge_does(float_dir, tmp_path, tokenizer, spec):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, path = exported(float_dir, tmp_path, spec)
    ids = prompt(tokenizer)
    ours_new = generate(model, ids, 16, SamplingConfig(temperature=0))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=TINY["context_length"], n_threads=2,
                          logits_all=True, verbose=False)
    llm.eval(ids)
    theirs_new = []
    for _ in range(16):
        theirs_new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(theirs_new[-1:])

    sequence = ids + ours_new
    with torch.no_grad():
        ours = model(torch.tensor([sequence]))[0]
    llm.reset()
    llm.eval(sequence)
    theirs = torch.from_numpy(np.array(llm.scores[:len(sequence)]))
    # llama.cpp rounds activations to 8 bits before multiplying by quantized weights: on this
    # model its logits move about 2% of their span (0.04% with the same weights as F32), and a
    # wrong block layout moves them by most of it (Q4_0 nibbles in lmforge's order: 71%).
    bound = 0.05 * (ours.max() - ours.min()).item()
    error = (theirs - ours).abs().max().item()
    agree = next((i for i, (a, b) in enumerate(zip(ours_new, theirs_new)) if a != b), 16)
    print(f"\n{spec.describe()}: llama.cpp's logits within {error:.3f} of lmforge's (bound "
          f"{bound:.3f}); greedy tokens agree for {agree} of 16")
    assert error < bound
    if agree < 16:  # only at a near tie: lmforge rates llama.cpp's pick almost as its own
        step = ours[len(ids) + agree - 1]
        assert step[ours_new[agree]] - step[theirs_new[agree]] < 2 * bound
