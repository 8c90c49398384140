"""Fused projections (q/k/v and w1/w3 as one matrix each), as GPUs run them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codellama.checkpoint import load_weights, shard_paths
from codellama.model import Transformer, build_empty

from .conftest import GQA_ARGS, MHA_ARGS


def plain_model(ckpt, fuse_first: bool = False, dtype=torch.float32) -> Transformer:
    """A CPU model with plain (not prepacked) weights, as on a GPU; optionally fused before
    loading, as Llama.build does there."""
    import dataclasses
    import json

    from codellama import distributed
    from codellama.model import ModelArgs

    distributed.setup_model_parallel(1, torch.device("cpu"))
    params = json.loads((ckpt / "params.json").read_text())
    args = ModelArgs.from_params(params, max_seq_len=64, max_batch_size=4)
    args = dataclasses.replace(args, vocab_size=params["vocab_size"])
    model = build_empty(args, "cpu", dtype)
    if fuse_first:
        assert model.fuse_projections()
    load_weights(model, shard_paths(ckpt))
    model.setup_cache()
    return model.eval().requires_grad_(False)


TOKENS = torch.tensor([[1, 7, 42, 99, 3, 250, 17, 8], [1, 5, 6, 7, 8, 9, 10, 11]])


@pytest.mark.parametrize("args", [GQA_ARGS, MHA_ARGS], ids=["gqa", "mha"])
@pytest.mark.parametrize("fuse_first", [True, False], ids=["before_loading", "after_loading"])
def test_fused_logits_equal_unfused(make_checkpoint, args, fuse_first):
    ckpt = make_checkpoint(args)
    want = plain_model(ckpt).forward(TOKENS)
    model = plain_model(ckpt, fuse_first=fuse_first)
    if not fuse_first:
        assert model.fuse_projections()
    assert model.layers[0].attention.wqkv is not None
    assert model.layers[0].feed_forward.w13 is not None
    torch.testing.assert_close(model.forward(TOKENS), want, rtol=1e-5, atol=1e-5)


def test_fusion_keeps_parameter_names_and_values(make_checkpoint):
    ckpt = make_checkpoint(GQA_ARGS)
    want = plain_model(ckpt).state_dict()
    got = plain_model(ckpt, fuse_first=True).state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_replaced_weight_is_used_not_the_stale_fused_matrix(make_checkpoint):
    ckpt = make_checkpoint(GQA_ARGS)
    fused, plain = plain_model(ckpt, fuse_first=True), plain_model(ckpt)
    for model in (fused, plain):
        torch.manual_seed(0)
        new = torch.randn_like(model.layers[1].attention.wk.weight)
        model.layers[1].attention.wk.weight = nn.Parameter(new, requires_grad=False)
        w1 = torch.randn_like(model.layers[0].feed_forward.w1.weight)
        model.layers[0].feed_forward.w1.weight = nn.Parameter(w1, requires_grad=False)
    torch.testing.assert_close(fused.forward(TOKENS), plain.forward(TOKENS))
    assert fused.layers[1].attention.wqkv is not None  # fused again, with the new weight


def test_an_in_place_update_reaches_the_fused_matrix(make_checkpoint):
    ckpt = make_checkpoint(GQA_ARGS)
    fused, plain = plain_model(ckpt, fuse_first=True), plain_model(ckpt)
    before = fused.layers[0].attention.wqkv
    for model in (fused, plain):
        with torch.no_grad():
            model.layers[0].attention.wv.weight.mul_(-2.0)
    assert fused.layers[0].attention.wqkv is before  # same matrix: the weight is a view
    torch.testing.assert_close(fused.forward(TOKENS), plain.forward(TOKENS))


def test_a_dtype_change_fuses_again_and_stays_right(make_checkpoint):
    ckpt = make_checkpoint(GQA_ARGS)
    fused = plain_model(ckpt, fuse_first=True).to(torch.float64)
    plain = plain_model(ckpt).to(torch.float64)
    fused.setup_cache(dtype=torch.float64)
    plain.setup_cache(dtype=torch.float64)
    torch.testing.assert_close(fused.forward(TOKENS), plain.forward(TOKENS))
    assert fused.layers[0].attention.wqkv.dtype == torch.float64


def test_prepacked_cpu_weights_are_not_fused(make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    wq = model.layers[0].attention.wq.weight
    if not (wq.is_mkldnn or wq.dim() > 2):
        pytest.skip("this machine keeps plain CPU weights (no native kernel, no oneDNN)")
    assert model.fuse_projections() is False
    assert model.layers[0].attention.wqkv is None


@pytest.mark.slow
def test_compiled_fused_decode_equals_eager_and_is_one_graph(make_checkpoint, build):
    from torch._dynamo.utils import counters

    ckpt = make_checkpoint(GQA_ARGS)
    prompts = [[1, 5, 9, 13], [1, 2]]
    want = build(ckpt, max_seq_len=32).generate(prompts, 6, temperature=0, stop_token=-1)[0]
    compiled = build(ckpt, max_seq_len=32, compile=True)
    assert compiled.model.fuse_projections()
    counters.clear()
    assert compiled.generate(prompts, 6, temperature=0, stop_token=-1)[0] == want
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
