"""``import llama``: scripts written for Meta's package run unchanged."""

from __future__ import annotations

import subprocess
import sys

import codellama
import codellama.model
import llama
import llama.generation
import llama.model
import llama.tokenizer

from .conftest import GQA_ARGS, REPO


def test_llama_top_level_names_are_codellamas():
    assert llama.Llama is codellama.Llama
    assert llama.ModelArgs is codellama.ModelArgs
    assert llama.Transformer is codellama.Transformer
    assert llama.Tokenizer is codellama.Tokenizer


def test_llama_exports_every_public_name_of_codellama_as_llama_2s_package_does():
    for name in codellama.__all__:  # e.g. `from llama import Llama, Dialog` (Llama 2's scripts)
        assert getattr(llama, name) is getattr(codellama, name), name


def test_a_misspelt_name_of_a_llama_submodule_is_an_import_error():
    import pytest

    with pytest.raises(ImportError):
        exec("from llama.model import Transfomer", {})


def test_importing_llama_binds_its_submodules_as_metas_package_does():
    code = "import llama; print(llama.model.Transformer, llama.generation.Llama, llama.tokenizer)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_llama_submodules_expose_metas_names():
    assert llama.model.RMSNorm is codellama.model.RMSNorm
    assert llama.tokenizer.Tokenizer is codellama.Tokenizer
    for name in ("B_INST", "E_INST", "B_SYS", "E_SYS", "SPECIAL_TAGS", "UNSAFE_ERROR", "Dialog",
                 "sample_top_p", "infilling_prompt_tokens", "dialog_prompt_tokens"):  # fmt: skip
        assert hasattr(llama.generation, name), name


def test_metas_infilling_keywords_give_the_same_tokens(tokenizer):
    ours = codellama.infilling_prompt_tokens(tokenizer, "def f(", "    return x", suffix_first=True)
    metas = llama.generation.infilling_prompt_tokens(
        tokenizer, pre="def f(", suf="    return x", suffix_first=True
    )
    assert metas == ours


def test_dialog_prompt_tokens_is_chat_prompt_tokens(tokenizer):
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ours = codellama.chat_prompt_tokens(tokenizer, dialog)
    assert llama.generation.dialog_prompt_tokens(tokenizer, dialog) == ours


def test_a_script_importing_llama_runs_in_a_fresh_process(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(GQA_ARGS)
    script = tmp_path / "user_script.py"
    script.write_text(
        "import sys\n"
        "from llama import Llama\n"
        "g = Llama.build(ckpt_dir=sys.argv[1], tokenizer_path=sys.argv[1] + '/tokenizer.model',\n"
        "                max_seq_len=64, max_batch_size=2)\n"
        "out = g.text_completion(['def add(a, b):'], max_gen_len=4, temperature=0.0)\n"
        "print('GENERATION', type(out[0]['generation']).__name__)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(ckpt)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GENERATION str" in proc.stdout


def test_metas_rotary_helpers_rotate_as_the_model_does():
    import torch

    from codellama.model import apply_rotary, rope_table

    g = torch.Generator().manual_seed(0)
    xq, xk = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)
    freqs = llama.model.precompute_freqs_cis(16, 12, theta=1e6)[3:8]
    # Meta's formula, written out: angles t / theta^(2i/d) as unit complex numbers
    inv = 1.0 / (1e6 ** (torch.arange(0, 16, 2)[:8].float() / 16))
    want = torch.polar(torch.ones(5, 8), torch.outer(torch.arange(3, 8).float(), inv))
    torch.testing.assert_close(freqs, want)
    q, k = llama.model.apply_rotary_emb(xq, xk, freqs)
    rotation = rope_table(16, 12, 1e6)[3:8].view(1, 5, 1, 8, 2)
    torch.testing.assert_close(q, apply_rotary(xq, rotation))
    torch.testing.assert_close(k, apply_rotary(xk, rotation))


def test_rms_norm_is_metas_norm_helper_rounded_then_scaled():
    import torch

    norm = llama.model.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    want = norm._norm(x.float()).type_as(x) * norm.weight  # Meta's RMSNorm.forward
    torch.testing.assert_close(norm(x), want, rtol=0, atol=0)


def test_metas_repeat_kv_repeats_each_head_in_place():
    import torch

    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    out = llama.model.repeat_kv(x, 3)
    assert out.shape == (2, 3, 6, 4)
    torch.testing.assert_close(out, torch.repeat_interleave(x, 3, dim=2))
    assert llama.model.repeat_kv(x, 1) is x


def test_cache_k_and_cache_v_hold_metas_layout_of_the_cached_keys(make_checkpoint, build):
    import torch

    llama_ = build(make_checkpoint(GQA_ARGS), max_seq_len=32, max_batch_size=2)
    model = llama_.model
    attn = model.layers[0].attention
    tokens = torch.tensor([[1, 5, 9, 12, 3], [1, 7, 2, 8, 4]])
    model(tokens, 0)
    h = model.layers[0].attention_norm(model.tok_embeddings(tokens))
    k = attn.wk(h).view(2, 5, attn.n_local_kv_heads, attn.head_dim)
    v = attn.wv(h).view(2, 5, attn.n_local_kv_heads, attn.head_dim)
    freqs = llama.model.precompute_freqs_cis(attn.head_dim, 64, theta=GQA_ARGS.rope_theta)[:5]
    _, k = llama.model.apply_rotary_emb(k, k, freqs)
    assert attn.cache_k.shape == (2, 32, attn.n_local_kv_heads, attn.head_dim)
    torch.testing.assert_close(attn.cache_k[:2, :5], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.cache_v[:2, :5], v)
    attn.cache_k.zero_()  # a view: writes reach the cache the model reads
    assert not attn.cache.k.any()


def test_cache_k_before_the_cache_exists_says_how_to_allocate_it(make_checkpoint, build):
    import dataclasses

    import pytest

    build(make_checkpoint(GQA_ARGS))  # sets up (one-process) model parallelism
    model = llama.model.Transformer(dataclasses.replace(GQA_ARGS, vocab_size=64))
    with pytest.raises(RuntimeError, match="setup_cache"):
        _ = model.layers[0].attention.cache_k
    model.setup_cache(max_batch_size=1, max_seq_len=8)
    assert model.layers[0].attention.cache_v.shape == (1, 8, 4, 8)


def test_layers_called_as_metas_forward_calls_them_give_the_models_logits(make_checkpoint, build):
    import torch

    model = build(make_checkpoint(GQA_ARGS), max_seq_len=32, max_batch_size=2).model
    tokens = torch.tensor([[1, 5, 9, 12, 3, 7], [1, 7, 2, 8, 4, 6]])
    want = model(tokens, 0)
    want_next = model(torch.tensor([[11], [13]]), 6)

    def metas_forward(tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Meta's Transformer.forward, written out against the model's parts."""
        seqlen = tokens.shape[1]
        h = model.tok_embeddings(tokens)
        freqs_cis = model.freqs_cis[start_pos : start_pos + seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
        for layer in model.layers:
            h = layer(h, start_pos, freqs_cis, mask)
        return model.output(model.norm(h)).float()

    torch.testing.assert_close(metas_forward(tokens, 0), want, rtol=1e-4, atol=1e-4)
    got_next = metas_forward(torch.tensor([[11], [13]]), 6)
    torch.testing.assert_close(got_next, want_next, rtol=1e-4, atol=1e-4)


def test_layers_take_metas_arguments_by_name(make_checkpoint, build):
    import torch

    model = build(make_checkpoint(GQA_ARGS), max_seq_len=32, max_batch_size=1).model
    tokens = torch.tensor([[1, 5, 9]])
    h = model.tok_embeddings(tokens)
    freqs_cis = model.freqs_cis[0:3]
    mask = torch.triu(torch.full((3, 3), float("-inf")), diagonal=1)
    layer = model.layers[0]
    by_name = layer(h, start_pos=0, freqs_cis=freqs_cis, mask=mask)
    attention = layer.attention.forward(h, start_pos=0, freqs_cis=freqs_cis, mask=mask)
    torch.testing.assert_close(by_name, layer(h, 0, freqs_cis, mask))
    torch.testing.assert_close(attention, layer.attention(h, 0, freqs_cis, mask))


def test_feed_forward_sizes_itself_by_metas_rule_from_metas_four_arguments(make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model  # sets up the model-parallel group
    args = model.params
    ff = llama.model.FeedForward(args.dim, 4 * args.dim, args.multiple_of, args.ffn_dim_multiplier)
    assert args.ffn_dim_multiplier is not None  # the rule's every step is exercised
    hidden = int(args.ffn_dim_multiplier * int(2 * (4 * args.dim) / 3))  # Meta's FeedForward
    hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
    assert ff.w1.weight.shape == (hidden, args.dim) == (args.ffn_hidden_dim, args.dim)
    assert llama.model.FeedForward(args.dim, 96).w1.weight.shape == (96, args.dim)
    import pytest

    with pytest.raises(codellama.ConfigError, match="ffn_dim_multiplier without multiple_of"):
        llama.model.FeedForward(args.dim, 96, ffn_dim_multiplier=1.3)


def test_metas_attribute_names_are_there(make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    block = model.layers[0]
    assert (block.n_heads, block.dim, block.head_dim) == (8, 64, 8)
    assert block.attention.n_kv_heads == 4
    assert model.freqs_cis.shape == (model.params.max_seq_len, 4) and model.freqs_cis.is_complex()
    assert llama.model.device == llama.generation.device == "cpu"


def test_a_layer_given_rotary_rows_of_the_wrong_length_says_what_it_needs(make_checkpoint, build):
    import pytest
    import torch

    model = build(make_checkpoint(GQA_ARGS)).model
    h = torch.zeros(1, 3, 64)
    with pytest.raises(codellama.PromptError, match=r"freqs_cis must be the \(3, 4\) rows"):
        model.layers[0](h, 0, model.freqs_cis[:2], None)
    end = model.params.max_seq_len
    with pytest.raises(codellama.PromptTooLongError, match="exceed the KV cache's"):
        model.layers[0](h, end - 2, torch.ones(3, 4, dtype=torch.complex64), None)
