"""Sampling picks Meta's tokens: nucleus sampling over a sorted row, drawn as
``torch.multinomial`` draws, whichever shortcut the CPU takes to get there."""

from __future__ import annotations

import re

import pytest
import torch

from codellama import sampling
from codellama.errors import NumericalError, PromptError
from codellama.sampling import block_noise, sample_top_p

from .conftest import meta_sample_top_p

VOCAB = 2000


def _probs(kind: str, seed: int, bsz: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, VOCAB, generator=g)
    if kind == "peaky":  # a trained model's next token: a few likely ones
        logits = logits * 12
    elif kind == "medium":  # a nucleus of tens to hundreds of tokens
        logits = logits * 3
    elif kind == "flat":  # a nucleus of most of the vocabulary
        logits = logits * 0.3
    elif kind == "ties":  # equal logits among the likely tokens, as copies of a row give
        logits = (logits * 4).round()
    elif kind == "top-k":  # zeros from a top-k (or min-p) cut
        logits = logits * 2
        kth = torch.topk(logits, 40, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif kind == "one-hot":
        logits = torch.full((bsz, VOCAB), float("-inf"))
        logits[torch.arange(bsz), torch.randint(0, VOCAB, (bsz,), generator=g)] = 0.0
    return torch.softmax(logits, dim=-1)


KINDS = ["peaky", "medium", "flat", "ties", "top-k", "one-hot"]


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("kind", KINDS)
def test_nucleus_sampling_picks_metas_tokens_and_spends_its_draws(kind, p):
    probs = _probs(kind, seed=len(kind) * 7 + int(p * 100))
    ours, meta = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(4):  # consecutive steps: the generators must stay in step too
        assert torch.equal(sample_top_p(probs, p, ours), meta_sample_top_p(probs, p, meta))
    assert torch.equal(ours.get_state(), meta.get_state())


@pytest.mark.parametrize("kind", KINDS)
def test_given_noise_picks_what_a_function_of_the_columns_picks(kind):
    probs = _probs(kind, seed=11)
    noise = torch.empty(probs.shape).exponential_(1, generator=torch.Generator().manual_seed(5))
    asked: list[int] = []

    def columns(width: int) -> torch.Tensor:
        asked.append(width)
        return noise[:, :width]

    assert torch.equal(
        sample_top_p(probs, 0.9, noise=columns), sample_top_p(probs, 0.9, noise=noise)
    )
    assert len(asked) == 1


def test_a_peaky_row_asks_only_for_its_nucleus_columns():
    probs = _probs("peaky", seed=2)
    asked: list[int] = []

    def columns(width: int) -> torch.Tensor:
        asked.append(width)
        return torch.ones(probs.shape[0], width)

    sample_top_p(probs, 0.9, noise=columns)
    biggest = int(((torch.sort(probs, descending=True).values.cumsum(-1)) < 0.9).sum(-1).max())
    assert asked == [biggest + 1]


def test_a_peaky_batch_does_not_sort_whole_rows(monkeypatch):
    probs = _probs("peaky", seed=4)

    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError("sorted the whole vocabulary")

    monkeypatch.setattr(torch, "sort", no_sort)
    assert sample_top_p(probs, 0.95, torch.Generator().manual_seed(0)).shape == (6, 1)


def test_tied_tokens_at_the_chosen_place_are_the_sorts():
    # Rows of many exactly equal probabilities: whatever topk's order of equal values,
    # the token at the chosen place must be the one torch.sort puts there.
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (8, VOCAB), generator=g).float() * 4
    probs = torch.softmax(logits, dim=-1)
    for seed in range(10):
        ours, meta = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sample_top_p(probs, 0.001, ours), meta_sample_top_p(probs, 0.001, meta))


def test_without_serial_cpu_draws_multinomial_picks_the_same(monkeypatch):
    probs = _probs("medium", seed=8)
    fast = sample_top_p(probs, 0.9, torch.Generator().manual_seed(1))
    monkeypatch.setattr(sampling, "_cpu_draws_are_serial", lambda: False)
    assert torch.equal(sample_top_p(probs, 0.9, torch.Generator().manual_seed(1)), fast)


@pytest.mark.parametrize("fast", [True, False], ids=["columns-only", "whole-block"])
def test_block_noise_gives_the_blocks_columns_and_spends_its_draws(fast):
    bsz, vocab, width, places = 5, 300, 17, [3, 0, 2]
    ref = torch.Generator().manual_seed(21)
    block = torch.empty(bsz, vocab).exponential_(1, generator=ref)
    gen = torch.Generator().manual_seed(21)
    assert torch.equal(block_noise(gen, bsz, vocab, places, width, fast), block[places, :width])
    assert torch.equal(gen.get_state(), ref.get_state())
    rows_only = block_noise(torch.Generator().manual_seed(21), bsz, vocab, [4], 3, fast, False)
    assert torch.equal(rows_only, block[[4], :3])


def test_the_cpu_draw_check_holds_on_this_torch():
    # If torch ever draws Exp(1) floats otherwise, MetaDraws and sample_top_p fall back to
    # whole blocks (still right, slower): this says so loudly instead of silently.
    assert sampling._cpu_draws_are_serial()


def _both(probs: torch.Tensor, p: float, seed: int = 0) -> tuple[object, object]:
    """(ours, Meta's): the tokens, or the type of the error raised."""
    out = []
    for fn in (sample_top_p, meta_sample_top_p):
        try:
            out.append(fn(probs.clone(), p, torch.Generator().manual_seed(seed)).tolist())
        except RuntimeError as e:
            out.append(RuntimeError if not isinstance(e, NumericalError) else NumericalError)
    return out[0], out[1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_probabilities_are_refused(bad):
    probs = _probs("medium", seed=1)
    probs[2, 5] = bad
    with pytest.raises(NumericalError, match="finite"):
        sample_top_p(probs, 0.9, torch.Generator().manual_seed(0))
    assert _both(probs, 0.9)[1] is RuntimeError  # as torch.multinomial refuses them


def test_a_negative_probability_is_refused_inside_the_nucleus_only_as_metas_code_does():
    probs = torch.tensor([[0.6, 0.5, -1e-9]])
    assert _both(probs, 0.5) == ([[0]], [[0]])  # masked out before multinomial sees it
    assert _both(probs[:, 1:], 1.0) == (NumericalError, RuntimeError)  # in the nucleus


@pytest.mark.parametrize(
    "probs, got",
    [
        (torch.full((2, 1, 4), 0.25), "a 3-D float32 tensor"),
        (torch.tensor([[1, 2, 3]]), "a 2-D int64 tensor"),
        ([[0.5, 0.5]], "list"),
    ],
    ids=["3-D", "integers", "list"],
)
def test_what_is_not_a_float_tensor_of_rows_is_refused_naming_what_it_is(probs, got):
    with pytest.raises(PromptError, match=re.escape(f"(batch, vocab) or (vocab,), got {got}")):
        sample_top_p(probs, 0.9)


@pytest.mark.parametrize("p", [-1.0, 1.5, float("nan")], ids=["negative", "above-1", "nan"])
def test_a_top_p_outside_0_1_is_refused_naming_top_p(p):
    with pytest.raises(PromptError, match="top_p"):
        sample_top_p(_probs("medium", seed=1), p)  # not blamed on the probabilities


def test_a_row_of_zeros_is_refused():
    probs = _probs("peaky", seed=3)
    probs[1] = 0.0
    assert _both(probs, 0.9) == (NumericalError, RuntimeError)


@pytest.mark.parametrize("layout", ["column-major", "strided", "one-row-1d"], ids=lambda x: str(x))
def test_other_layouts_pick_metas_tokens(layout):
    probs = _probs("medium", seed=6)
    if layout == "column-major":  # multinomial's noise follows the memory layout
        probs = probs.t().contiguous().t()
    elif layout == "strided":
        probs = torch.softmax(torch.randn(4, 2 * VOCAB) * 3, dim=-1)[:, ::2]
    else:
        probs = probs[0]
    for seed in range(5):
        assert _both(probs, 0.9, seed)[0] == _both(probs, 0.9, seed)[1]


def test_a_row_cut_by_top_k_does_not_make_a_wide_nucleus_sort_whole_rows(monkeypatch):
    probs = torch.cat([_probs("top-k", seed=1, bsz=1), _probs("medium", seed=2, bsz=1)])
    widest = int(((torch.sort(probs, descending=True).values.cumsum(-1)) < 0.95).sum(-1).max())
    assert widest > sampling.HEAD_FIRST  # the medium row's nucleus needs a second look
    sort = torch.sort

    def sort_only_rows_with_ties(t: torch.Tensor, *args: object, **kwargs: object):
        assert t.shape[0] < probs.shape[0], "sorted the whole batch"
        return sort(t, *args, **kwargs)

    want = meta_sample_top_p(probs.clone(), 0.95, torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "sort", sort_only_rows_with_ties)
    assert torch.equal(sample_top_p(probs, 0.95, torch.Generator().manual_seed(0)), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_pick_what_multinomial_picks_in_that_dtype(dtype):
    # torch.multinomial draws its noise in the probabilities' dtype: float32 noise must not
    # stand in for it (it picks otherwise where probs / noise is nearly tied).
    for seed in range(1000):
        g = torch.Generator().manual_seed(seed)
        probs = torch.softmax(torch.randn(1, 2 + seed % 6, generator=g).to(dtype), dim=-1)
        ours, meta = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sample_top_p(probs, 1.0, ours), meta_sample_top_p(probs, 1.0, meta))


def test_float64_probabilities_are_divided_by_float64_noise():
    seed = 0
    q = torch.empty(2, dtype=torch.float64).exponential_(
        1, generator=torch.Generator().manual_seed(seed)
    )
    exact, rounded = (q[0] / q[1]).item(), (q.float()[0].double() / q.float()[1].double()).item()
    assert exact != rounded  # so that a ratio between them tells the two apart
    ratio = (exact + rounded) / 2
    probs = torch.tensor([[ratio / (1 + ratio), 1 / (1 + ratio)]], dtype=torch.float64)
    ours, meta = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert torch.equal(sample_top_p(probs, 1.0, ours), meta_sample_top_p(probs, 1.0, meta))


def test_min_p_of_one_keeps_only_the_most_likely_tokens():
    """HF's MinPLogitsWarper takes min_p = 1 (the tokens as likely as the best one)."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -2.0]])
    params = sampling.SamplingParams(temperature=1.5, top_p=1.0, min_p=1.0)
    g = torch.Generator().manual_seed(0)
    picks = {int(sampling.sample(logits, params, g)) for _ in range(40)}
    assert picks == {1, 3}
