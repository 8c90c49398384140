"""The transformer against Hugging Face's LlamaForCausalLM, and its KV-cache arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from codellama import model as model_module
from codellama.checkpoint import load_shard, merge_shards, shard_paths
from codellama.model import ModelArgs

from .conftest import GQA_ARGS, MHA_ARGS

transformers = pytest.importorskip("transformers", reason="the HF oracle needs `transformers`")


def _permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> HF's rotate_half halves (per head)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_model(ckpt, args: ModelArgs, vocab: int):
    sd = merge_shards(load_shard(p) for p in shard_paths(ckpt))
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config.rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
    hf = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
          "lm_head.weight": sd["output.weight"]}  # fmt: skip
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = _permute_for_hf(
            sd[p + "attention.wq.weight"], args.n_heads
        )
        hf[q + "self_attn.k_proj.weight"] = _permute_for_hf(
            sd[p + "attention.wk.weight"], args.kv_heads
        )
        hf[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        hf[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        hf[q + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        hf[q + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        hf[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        hf[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(hf, strict=True)
    return model


@pytest.mark.parametrize("args", [MHA_ARGS, GQA_ARGS], ids=["mha", "gqa-ffnmult-theta1e6"])
def test_logits_match_hugging_face(make_checkpoint, build, args):
    ckpt = make_checkpoint(args, std=0.05)
    llama = build(ckpt, max_seq_len=64)
    vocab = llama.model.params.vocab_size
    hf = _hf_model(ckpt, dataclasses.replace(args, vocab_size=vocab), vocab)
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = llama.model.forward(tokens, 0)
    with torch.no_grad():
        theirs = hf(tokens).logits.float()
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_incremental_decoding_equals_full_forward(make_checkpoint, build):
    llama = build(make_checkpoint(GQA_ARGS), max_seq_len=64)
    tokens = torch.randint(
        0, llama.model.params.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    full = llama.model.forward(tokens, 0)
    pieces = [llama.model.forward(tokens[:, :10], 0)]
    pieces += [llama.model.forward(tokens[:, i : i + 1], i) for i in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args", [GQA_ARGS, MHA_ARGS], ids=["gqa", "mha"])
@pytest.mark.parametrize("path", ["cpu-flash", "masked-blocks"])
def test_chunks_at_nonzero_start_pos_equal_full_forward(
    make_checkpoint, build, monkeypatch, args, path
):
    """Meta's square mask is wrong here (start_pos > 0 with several tokens). On the CPU a
    chunk attends its past and itself apart (merged by log-sum-exp); elsewhere in blocks of
    query rows under small masks (forced here: 3 rows a block)."""
    if path == "masked-blocks":
        monkeypatch.setattr(model_module, "_cpu_flash_attention", lambda: None)
        monkeypatch.setattr(model_module, "ATTENTION_MASK_BYTES", 4 * 3 * 64)
    llama = build(make_checkpoint(args), max_seq_len=64)
    tokens = torch.randint(
        0, llama.model.params.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2)
    )
    full = llama.model.forward(tokens, 0)
    pieces = [llama.model.forward(tokens[:, s : s + 7], s) for s in range(0, 30, 7)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_per_row_positions_equal_shared_positions(make_checkpoint, build):
    llama = build(make_checkpoint(GQA_ARGS), max_seq_len=64)
    model = llama.model
    tokens = torch.randint(
        0, model.params.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3)
    )
    full = model.forward(tokens, 0)
    model.forward_tokens(tokens[:, :8], 0)
    positions = torch.tensor([[8], [8]])
    step = model.forward_tokens(tokens[:, 8:9], positions=positions, kv_len=9)
    torch.testing.assert_close(step[:, 0], full[:, 8], atol=1e-4, rtol=1e-4)


def test_ffn_hidden_size_follows_meta_formula():
    assert ModelArgs(dim=4096).ffn_hidden_dim == 11008  # 7B
    assert ModelArgs(dim=5120).ffn_hidden_dim == 13824  # 13B
    assert ModelArgs(dim=8192, ffn_dim_multiplier=1.0).ffn_hidden_dim == 22016  # 34B
    assert (
        ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).ffn_hidden_dim == 28672
    )  # 70B


@pytest.mark.parametrize("mp", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_matches_a_checkpoints_tensors(make_checkpoint, mp, dtype):
    from codellama.model import weight_bytes

    ckpt = make_checkpoint(GQA_ARGS, n_shards=mp)
    shards = [load_shard(p) for p in shard_paths(ckpt)]
    per_rank = sum(t.numel() for t in shards[0].values()) * dtype.itemsize
    vocab = shards[0]["tok_embeddings.weight"].shape[0]  # the embedding is split along dim 1
    args = dataclasses.replace(GQA_ARGS, vocab_size=vocab)
    assert weight_bytes(args, dtype, mp) == per_rank


def _metas_rotary(x: torch.Tensor, theta: float, start: int) -> torch.Tensor:
    """Meta's formulation: complex frequencies from torch.polar, multiplied in complex64."""
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    t = torch.arange(start, start + x.shape[1], dtype=torch.float32)
    cis = torch.polar(torch.ones(x.shape[1], d // 2), torch.outer(t, freqs))
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis.view(1, x.shape[1], 1, -1)).flatten(3).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 4090])
def test_both_rotary_formulas_equal_metas(dtype, start):
    from codellama.model import rope_table, rotate_complex, rotate_real

    x = torch.randn(2, 5, 3, 16).to(dtype)
    rot = rope_table(16, 4096 + 8, 1e6)[start : start + 5].view(1, 5, 1, 8, 2)
    want = _metas_rotary(x, 1e6, start)
    torch.testing.assert_close(rotate_complex(x, rot), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(rotate_real(x, rot), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_linear_layer_is_callable_however_its_weight_is_kept(make_checkpoint, build, dtype):
    llama = build(make_checkpoint(GQA_ARGS), dtype=dtype)  # CPU: weights packed for kernels
    model = llama.model
    plain = model.state_dict()
    x = torch.randn(3, 5, GQA_ARGS.dim, generator=torch.Generator().manual_seed(0))
    x = x.to(model.dtype)
    layer = model.layers[1]
    for name, module in [("layers.1.attention.wq", layer.attention.wq),
                         ("layers.1.attention.wv", layer.attention.wv),
                         ("layers.1.feed_forward.w1", layer.feed_forward.w1),
                         ("output", model.output)]:  # fmt: skip
        want = x.float() @ plain[name + ".weight"].float().T
        torch.testing.assert_close(module(x).float(), want, rtol=2e-2, atol=2e-2)
    hidden = torch.randn(3, 5, model.params.ffn_hidden_dim, generator=torch.Generator())
    want = hidden @ plain["layers.1.feed_forward.w2.weight"].float().T
    got = layer.feed_forward.w2(hidden.to(model.dtype)).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


def test_a_biased_parallel_linear_adds_its_bias_as_fairscales_does(make_checkpoint, build):
    build(make_checkpoint(GQA_ARGS))  # sets up (one-process) model parallelism
    torch.manual_seed(0)
    col = model_module.ColumnParallelLinear(8, 4, bias=True)
    row = model_module.RowParallelLinear(8, 4, bias=True)
    with torch.no_grad():
        col.bias.fill_(1.0)
        row.bias.fill_(2.0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(col(x), x @ col.weight.T + 1.0)
    torch.testing.assert_close(row(x), x @ row.weight.T + 2.0)


def test_the_rotary_table_built_in_chunks_equals_the_whole_computation():
    n = 2 * model_module.ROPE_CHUNK + 3
    table = model_module.rope_table(8, n, 1e6)
    whole = torch.stack(model_module.rope_tables(8, n, 1e6), dim=-1)
    assert torch.equal(table, whole)


def test_the_memory_check_counts_the_rotary_table(monkeypatch):
    from codellama import distributed
    from codellama.errors import OutOfMemoryError
    from codellama.generation import _check_memory

    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=1, vocab_size=64,
                     max_seq_len=100_000, max_batch_size=1)  # fmt: skip
    need = model_module.weight_bytes(args, torch.bfloat16) + model_module.kv_cache_bytes(
        args, torch.bfloat16
    )
    rope = model_module.rope_table_bytes(args)
    assert rope == model_module.rope_table(args.head_dim, 10, 1e4).nbytes * args.max_seq_len // 10
    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "available_memory", lambda device: need + rope)
    _check_memory(args, torch.bfloat16, cpu, 1)
    monkeypatch.setattr(distributed, "available_memory", lambda device: need + rope - 1)
    with pytest.raises(OutOfMemoryError):
        _check_memory(args, torch.bfloat16, cpu, 1)
