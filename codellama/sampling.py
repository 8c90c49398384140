"""Turning logits into tokens: temperature, top-p (Meta's), top-k, min-p, repetition penalty."""

from __future__ import annotations

import functools
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


# Random numbers a batch may spend catching up with Meta's draws for the positions of its
# longer prompts (about 3 ns each on a CPU): beyond it, see MetaDraws.affordable.
MAX_CATCH_UP_DRAWS = 2**28


class MetaDraws:
    """The random numbers that Meta's ``generate`` spends on each row of a batch.

    Meta's loop runs over positions from the shortest prompt's length on and, at each one,
    draws a (batch, vocab) block of Exp(1) noise (inside ``torch.multinomial``) for every
    row, including rows still reading their prompt. Row ``r``'s ``k``-th new token thus
    uses row ``r`` of block ``len(prompt r) - shortest + k``. We prefill every prompt at
    once and then advance all rows together, so the blocks are passed in Meta's order,
    keeping the generator's state at the start of each block a row will need; a row's noise
    is drawn from there when it needs it. The same seed thus samples the same tokens as
    Meta's code, whatever the prompt lengths.

    On the CPU, where torch draws one 64-bit number per element in order, passing a block
    or the rows before a row's takes as many raw 64-bit numbers instead of Exp(1) floats,
    4x faster (checked once per process by :func:`_cpu_draws_are_serial`).
    """

    def __init__(
        self,
        generator: torch.Generator,
        batch_rows: list[int],
        offsets: list[int],
        budgets: list[int],
        vocab: int,
    ):
        self.generator = generator
        self.batch_rows = batch_rows  # row i's place in the caller's order (Meta's row)
        self.offsets = offsets  # row i's first block: its prompt length - the shortest
        self.budgets = budgets  # how many tokens row i may take
        self.shape = (len(batch_rows), vocab)
        self.fast = generator.device.type == "cpu" and _cpu_draws_are_serial()
        self.step = 0
        self.next_block = 0  # the generator is at the start of this block
        self.states: dict[int, torch.Tensor] = {}  # block -> generator state at its start
        self._scratch = torch.empty(0, dtype=torch.int64)  # for _pass, reused

    @staticmethod
    def affordable(lens: list[int], vocab: int) -> bool:
        """Whether catching up with Meta's draws over the spread of prompt lengths ``lens``
        stays within MAX_CATCH_UP_DRAWS. If not, a batch draws each step's noise afresh
        (still from its seeded generator), like a batch of equal lengths."""
        return (max(lens) - min(lens)) * len(lens) * vocab <= MAX_CATCH_UP_DRAWS

    def _pass(self, n: int) -> None:
        """Move the generator past ``n`` Exp(1) draws without keeping them."""
        if not self.fast:
            self._draw(n)
            return
        if self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.int64)
        _pass_cpu(self._scratch[:n], self.generator)

    def _draw(self, n: int) -> torch.Tensor:
        device = self.generator.device
        return torch.empty(n, device=device).exponential_(1, generator=self.generator)

    def take(self, active: list[int]) -> torch.Tensor:
        """This step's (B, V) noise: row ``i`` of ``active`` gets its Meta block's row; the
        other rows (finished) get ones, which pick their most likely token."""
        step = self.step
        self.step += 1
        bsz, vocab = self.shape
        want: dict[int, list[int]] = {}  # block -> the active rows that take it now
        for i in active:
            want.setdefault(self.offsets[i] + step, []).append(i)
        lowest = min(want, default=-1)  # the block of the row furthest behind
        noise = torch.ones(self.shape, device=self.generator.device)

        def whole_block(rows: list[int]) -> None:  # as multinomial draws it
            block = self._draw(bsz * vocab).view(bsz, vocab)
            for i in rows:
                noise[i] = block[self.batch_rows[i]]

        while want and self.next_block <= max(want):
            b = self.next_block
            self.next_block += 1
            if any(step <= b - self.offsets[i] < self.budgets[i] for i in active):
                self.states[b] = self.generator.get_state()
            rows = want.get(b, [])
            if rows and (not self.fast or len(rows) > 1):
                whole_block(want.pop(b))  # drawn as it is passed
            else:
                self._pass(bsz * vocab)
        now = self.generator.get_state()
        for b, rows in want.items():
            self.generator.set_state(self.states[b])
            if not self.fast or len(rows) > 1:
                whole_block(rows)
                continue
            (i,) = rows
            self._pass(self.batch_rows[i] * vocab)  # the rows before this one
            noise[i] = self._draw(vocab)
        self.generator.set_state(now)
        for b in [b for b in self.states if b <= lowest]:
            del self.states[b]  # every row that takes it has (rows advance together)
        return noise


def _pass_cpu(scratch: torch.Tensor, generator: torch.Generator) -> None:
    """Take one 64-bit number per element of int64 ``scratch`` from CPU ``generator``."""
    scratch.random_(generator=generator)


@functools.cache
def _cpu_draws_are_serial() -> bool:
    """Whether torch's CPU generator draws Exp(1) floats one 64-bit number each, in order,
    as :func:`_pass_cpu` takes them (so that passing n draws can be done by it, and a
    block's row r is what follows r rows of draws)."""
    n = 40_000
    whole = torch.Generator().manual_seed(20231)
    block = torch.empty(3, n).exponential_(1, generator=whole)
    parts = torch.Generator().manual_seed(20231)
    _pass_cpu(torch.empty(n, dtype=torch.int64), parts)
    middle = torch.empty(n).exponential_(1, generator=parts)
    _pass_cpu(torch.empty(n, dtype=torch.int64), parts)
    return torch.equal(block[1], middle) and torch.equal(whole.get_state(), parts.get_state())
