"""Gemma 3 from GGUF files: a tiny one written here (fast), and Gemma 3 270M, the registry's
second real model (a Q4_K_M GGUF from PyPI; slow: transformers needs minutes to read it). In
both, lmforge's import computes what transformers computes from the same file."""

from __future__ import annotations

import gguf
import pytest
import torch

from lmforge.chat import chat_prompt_ids
from lmforge.eval import perplexity
from lmforge.infer.engine import generate
from lmforge.infer.sampling import SamplingConfig
from lmforge.interop.gguf import import_gguf, read_gguf
from lmforge.open import open_model

from .smollm2 import registered_gguf, transformers_from_gguf

transformers = pytest.importorskip("transformers")
# transformers' perplexity on the same file and text (the first 20,000 characters of Tiny
# Shakespeare), measured once: 128.1788, as ours (it takes minutes, so it is not rerun).
GEMMA3_PPL = 128.1788
TEXTS = ["The meaning of life is", "  two leading spaces\tand a tab", "naïve café 日本語 😀 1234",
         "line1\r\nline2\n\n\nline3   ", "<start_of_turn>user\nhi<end_of_turn>\n"]


# A sentencepiece vocabulary in Gemma's layout: control tokens, user-defined newlines, byte
# fallback pieces, then words with "▁" for a space, in merge order (the file has no merges).
PIECES = ["▁", "t", "h", "e", "a", "n", "d", "o", "▁t", "he", "▁the", "an", "▁an", "▁and",
          "nd", "▁a", "en", "▁th", "at", "▁h", "ha", "ot", "▁hat", "▁hot", "the"]
TINY_TEXTS = ["the hat and the hot", "  the\n\nend", "ünd hat", "<end_of_turn>\nthe"]


def tiny_gemma3_gguf(path, hf_model) -> None:
    """What llama.cpp's converter writes for a Gemma 3 model: its tensors under GGUF names,
    norm weights as 1 + w, q/k rows as they are, and a sentencepiece vocabulary."""
    cfg = hf_model.config
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n",
              *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
    kinds = [3] * 6 + [4, 4] + [6] * 256 + [1] * len(PIECES)
    assert len(tokens) == cfg.vocab_size
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(kinds)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight":
            continue
        name = name.removeprefix("model.")
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            module = rest.removesuffix(".weight")
            gguf_name = f"blk.{layer}.{names[module]}.weight"
        else:
            gguf_name = {"embed_tokens.weight": "token_embd.weight",
                         "norm.weight": "output_norm.weight"}[name]
        array = tensor.float().numpy()
        writer.add_tensor(gguf_name, array + 1 if "norm" in gguf_name else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_tiny_gemma3_gguf_reads_as_transformers_reads_it(tmp_path):
    config = transformers.Gemma3TextConfig(
        vocab_size=264 + len(PIECES), hidden_size=32, intermediate_size=64, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64, sliding_window=4,
        # transformers reads no query_pre_attn_scalar from a GGUF: it takes Gemma's 256
        head_dim=256, query_pre_attn_scalar=256, rope_theta=1e6, rope_local_base_freq=1e4)
    torch.manual_seed(0)
    hf_model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "tiny-gemma3.gguf"
    tiny_gemma3_gguf(path, hf_model)

    cfg, _, tokenizer, generation = read_gguf(path)
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert generation["eos_token_id"] == [1, 5]  # <end_of_turn> ends a turn of the template
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TINY_TEXTS:
        assert tokenizer.encode_prompt(text) == theirs(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    model = open_model(import_gguf(path, tmp_path / "ours")).model
    hf_read = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        ours, original, read = model(ids), hf_model(ids).logits, hf_read(ids).logits
    torch.testing.assert_close(ours, original, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, read, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def gemma3():
    return registered_gguf("gemma3-270m")


@pytest.fixture(scope="module")
def ours(gemma3, tmp_path_factory):
    opened = open_model(import_gguf(gemma3, tmp_path_factory.mktemp("gemma3")))
    return opened.model, opened.tokenizer


@pytest.fixture(scope="module")
def theirs(gemma3):
    return transformers_from_gguf(gemma3)


@pytest.mark.slow
def test_config_tokens_and_turns(ours, theirs):
    model, tokenizer = ours
    hf_model, hf_tokenizer = theirs
    cfg = model.cfg
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (18, 640, 4, 1, 256)
    assert cfg.layer_types == hf_model.config.layer_types
    assert cfg.sliding_window == hf_model.config.sliding_window == 512
    for text in TEXTS:
        assert tokenizer.encode_prompt(text) == hf_tokenizer(text)["input_ids"]
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi!"}])
    assert tokenizer.decode(ids) == "<bos><start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_logits_greedy_and_perplexity_match_transformers(ours, theirs, shakespeare):
    model, tokenizer = ours
    hf_model, hf_tokenizer = theirs
    ids = tokenizer.encode_prompt(shakespeare[:20_000])
    assert ids == hf_tokenizer(shakespeare[:20_000])["input_ids"]
    with torch.no_grad():  # past the 512-token window, so the windowed layers are checked
        logits = model(torch.tensor([ids[:700]]))
        logit_diff = (logits - hf_model(torch.tensor([ids[:700]])).logits).abs().max().item()
    our_ppl, count = perplexity(model, ids)

    prompt = tokenizer.encode_prompt("The meaning of life is")
    our_tokens = generate(model, prompt, 30, SamplingConfig(temperature=0))
    their_tokens = list(prompt)
    with torch.no_grad():  # plain greedy steps: transformers' generate would stop at EOS
        for _ in range(30):
            their_tokens.append(int(hf_model(torch.tensor([their_tokens])).logits[0, -1].argmax()))
    print(f"\nGemma 3 270M: max |logit diff| over 700 tokens {logit_diff:.3g}; perplexity on "
          f"{count} tokens {our_ppl:.4f}; greedy: "
          f"{tokenizer.decode(our_tokens)!r}")
    assert logit_diff < 1e-2
    assert count == 5689
    assert abs(our_ppl / GEMMA3_PPL - 1) < 1e-3
    assert our_tokens == their_tokens[len(prompt):]
