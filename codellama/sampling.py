"""Turning logits into tokens: temperature, top-p (Meta's), top-k, min-p, repetition penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import PromptError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy (argmax).

    ``top_p`` keeps the smallest set of tokens whose probability mass reaches p (Meta's
    nucleus sampling); ``top_k`` (0 = off) the k most likely; ``min_p`` (0 = off) the tokens
    at least ``min_p`` times as likely as the best one; ``repetition_penalty`` (1 = off)
    divides positive logits (multiplies negative ones) of tokens already in the sequence.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise PromptError(
                f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}"
            )
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise PromptError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p < 1:
            raise PromptError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise PromptError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PromptError(f"{name} must be a finite number, got {value!r}")


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty on tokens marked in ``seen`` (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_top_p(
    probs: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Nucleus sampling over (B, V) probabilities; returns (B, 1) token ids (Meta's rule)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort = probs_sort.masked_fill(probs_sum - probs_sort > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of float32 ``logits`` (B, V); returns (B,) int64."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    best = torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A row whose probabilities are not finite (NaN/inf logits, or a temperature so small that
    # logits / temperature overflows) falls back to its argmax, the temperature -> 0 limit,
    # instead of failing inside torch.multinomial; callers check the logits themselves
    # (Llama raises NumericalError naming the step). Branch-free: no host sync.
    ok = torch.isfinite(probs).all(dim=-1, keepdim=True)
    probs = torch.where(ok, probs, torch.zeros_like(probs).scatter_(-1, best, 1.0))
    if params.min_p > 0:
        floor = probs.amax(dim=-1, keepdim=True) * params.min_p
        probs = probs.masked_fill(probs < floor, 0.0)
    # Always through the sorted nucleus path (also for top_p == 1), as Meta's code does, so
    # that a seed draws the same tokens.
    return sample_top_p(probs, params.top_p, generator).view(-1)
