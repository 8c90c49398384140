"""state_dict() and load_state_dict() speak plain (N, K) weights in Meta's names, however the
model keeps them (packed for the native kernels, in bf16 for an fp32 model, oneDNN's)."""

from __future__ import annotations

import pytest
import torch

from codellama.checkpoint import TOLERATED_EXTRA_KEYS, load_shard

from .conftest import GQA_ARGS

TOKENS = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2, 6, 8, 10]])


def _checkpoint_tensors(ckpt) -> dict[str, torch.Tensor]:
    sd = load_shard(ckpt / "consolidated.00.pth")
    return {k: v for k, v in sd.items() if k not in TOLERATED_EXTRA_KEYS}


@pytest.mark.parametrize(
    ("dtype", "disk"),
    [("float32", torch.bfloat16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)],
)
def test_state_dict_gives_the_checkpoints_weights(make_checkpoint, build, dtype, disk):
    ckpt = make_checkpoint(GQA_ARGS, dtype=disk)
    model = build(ckpt, dtype=dtype).model
    want = _checkpoint_tensors(ckpt)
    got = model.state_dict()
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == model.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor.to(model.dtype)), key


def test_load_state_dict_replaces_the_weights_and_packs_them_again(make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS, dtype=torch.bfloat16)).model
    sd = model.state_dict()
    changed = {k: (v * 0.5 if k.endswith(("wq.weight", "w2.weight", "output.weight")) else v)
               for k, v in sd.items()}  # fmt: skip
    other = build(make_checkpoint(GQA_ARGS, dtype=torch.bfloat16)).model
    other.use_native_kernel(None)  # plain weights: the reference
    other.load_state_dict(changed)
    want = other.forward(TOKENS)
    model.load_state_dict(changed)
    for layer in model.linear_layers():
        assert layer.weight.dim() > 2 and layer.native_plan.owned_layout  # packed again
        assert layer.native_plan.w16  # halved values stay exact in bf16
    assert model.native_decoder is not None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in changed.items())
    torch.testing.assert_close(model.forward(TOKENS), want, rtol=1e-4, atol=1e-4)


def test_a_weight_of_the_wrong_shape_is_refused_and_the_model_still_works(make_checkpoint, build):
    model = build(make_checkpoint(GQA_ARGS)).model
    before = model.forward(TOKENS)
    sd = model.state_dict()
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:, :-1]
    with pytest.raises(RuntimeError, match="layers.0.attention.wq.weight"):
        model.load_state_dict(sd)
    assert torch.equal(model.forward(TOKENS), before)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_dict_of_onednn_prepacked_weights_is_plain(make_checkpoint, build, dtype):
    ckpt = make_checkpoint(GQA_ARGS, dtype=torch.bfloat16)
    model = build(ckpt, dtype=dtype).model
    model.use_native_kernel(None)  # oneDNN's layout where it has one
    got = model.state_dict()
    for key, tensor in _checkpoint_tensors(ckpt).items():
        assert not got[key].is_mkldnn and torch.equal(got[key], tensor.to(model.dtype)), key
