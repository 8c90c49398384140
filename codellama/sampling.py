"""Turning logits into tokens: temperature, top-p (Meta's), top-k, min-p, repetition penalty."""

from __future__ import annotations

import math
import numbers
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
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, numbers.Integral)
            or self.top_k < 0
        ):
            raise PromptError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p < 1:
            raise PromptError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise PromptError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}"
            )
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):  # numpy's too
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "top_k", int(self.top_k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PromptError(f"{name} must be a finite number, got {value!r}")


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty on tokens marked in ``seen`` (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_top_p(
    probs: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Nucleus sampling over (B, V) probabilities; returns (B, 1) token ids (Meta's rule).

    With ``noise`` ((B, V) Exp(1) draws, see :class:`MetaDraws`) the choice is
    ``argmax(probs / noise)`` over the sorted probabilities: exactly what
    ``torch.multinomial(probs, 1)`` computes from the draws it makes itself.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort = probs_sort.masked_fill(probs_sum - probs_sort > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    if noise is None:
        choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    else:
        choice = torch.argmax(probs_sort / noise, dim=-1, keepdim=True)
    return torch.gather(probs_idx, -1, choice)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row of float32 ``logits`` (B, V); returns (B,) int64. ``noise``
    replaces the random draws (see :func:`sample_top_p`)."""
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
    return sample_top_p(probs, params.top_p, generator, noise).view(-1)


# Noise kept for rows that need it later (at most: beyond it, blocks are drawn again).
KEPT_NOISE_BYTES = 256 << 20


class MetaDraws:
    """The random numbers that Meta's ``generate`` spends on each row of a batch.

    Meta's loop runs over positions from the shortest prompt's length on and, at each one,
    draws a (batch, vocab) block of noise (inside ``torch.multinomial``) for every row,
    including rows still reading their prompt. Row ``r``'s ``k``-th new token therefore
    uses row ``r`` of block ``len(prompt r) - shortest + k``. We prefill every prompt at
    once and then advance all rows together, so the blocks are drawn in Meta's order, once
    each, and the parts a row needs later are kept (up to ``keep_bytes``; beyond that the
    generator's state is kept and the block drawn again when needed). The same seed thus
    samples the same tokens as Meta's code, whatever the prompt lengths.
    """

    def __init__(
        self,
        generator: torch.Generator,
        batch_rows: list[int],
        offsets: list[int],
        budgets: list[int],
        vocab: int,
        keep_bytes: int | None = None,
    ):
        self.generator = generator
        self.batch_rows = batch_rows  # row i's place in the caller's order (Meta's row)
        self.offsets = offsets  # row i's first block: its prompt length - the shortest
        self.budgets = budgets  # how many tokens row i may take
        self.shape = (len(batch_rows), vocab)
        keep_bytes = KEPT_NOISE_BYTES if keep_bytes is None else keep_bytes
        self.keep = max(keep_bytes // (4 * vocab), 0)  # row noises kept at most
        self.step = 0
        self.next_block = 0  # the generator is at the start of this block
        self.kept: dict[tuple[int, int], torch.Tensor] = {}  # (block, row) -> (V,)
        self.states: dict[int, torch.Tensor] = {}  # block -> generator state before it

    def _draw(self) -> torch.Tensor:
        device = self.generator.device
        return torch.empty(self.shape, device=device).exponential_(1, generator=self.generator)

    def _needs(self, i: int, block: int, step: int) -> bool:
        """Whether row ``i`` will take ``block`` at ``step`` or later."""
        k = block - self.offsets[i]
        return step <= k < self.budgets[i]

    def take(self, active: list[int]) -> torch.Tensor:
        """This step's (B, V) noise: row ``i`` of ``active`` gets its Meta block's row; the
        other rows (finished) get ones, which pick their most likely token."""
        step = self.step
        self.step += 1
        alive = set(active)
        for key in [k for k in self.kept if k[1] not in alive or k[0] < self.offsets[k[1]] + step]:
            del self.kept[key]
        want = {i: self.offsets[i] + step for i in active}
        rows: dict[int, torch.Tensor] = {}
        while want and self.next_block <= max(want.values()):
            b = self.next_block
            state = self.generator.get_state()
            block = self._draw()
            self.next_block += 1
            for i in active:
                if want[i] == b:
                    rows[i] = block[self.batch_rows[i]]
                elif self._needs(i, b, step + 1):
                    if len(self.kept) < self.keep:
                        self.kept[(b, i)] = block[self.batch_rows[i]].clone()
                    else:
                        self.states[b] = state
        redrawn: dict[int, torch.Tensor] = {}
        for i in active:
            if i in rows:
                continue
            b = want[i]
            if (b, i) in self.kept:
                rows[i] = self.kept.pop((b, i))
                continue
            if b not in redrawn:
                now = self.generator.get_state()
                self.generator.set_state(self.states[b])
                redrawn[b] = self._draw()
                self.generator.set_state(now)
            rows[i] = redrawn[b][self.batch_rows[i]]
        first = min(want.values(), default=self.next_block)
        for b in [b for b in self.states if b < first]:
            del self.states[b]
        noise = torch.ones(self.shape, device=self.generator.device)
        for i, row in rows.items():
            noise[i] = row
        return noise
