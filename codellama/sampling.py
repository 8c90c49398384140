"""Turning logits into tokens: temperature, top-p (Meta's), top-k, min-p, repetition penalty."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from .errors import NumericalError, PromptError


class SamplingExtras(TypedDict, total=False):
    """The sampling keywords the text APIs take beyond Meta's temperature and top_p."""

    top_k: int
    min_p: float
    repetition_penalty: float


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy (argmax).

    ``top_p`` keeps, most likely first, each token whose predecessors' mass is at most p
    (Meta's nucleus sampling: at an exact tie with p one more token than Hugging Face's
    rule, and at p = 1 the float32 sum may drop tails below 1e-8, as Meta's does); ``top_k`` (0 = off) the k most likely; ``min_p`` (0 = off) the tokens
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
        _check_top_p(self.top_p)
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, numbers.Integral)
            or self.top_k < 0
        ):
            raise PromptError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise PromptError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
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
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):
        raise PromptError(f"{name} must be a finite number (int or float), got {value!r:.60}")
    if not math.isfinite(value):
        raise PromptError(f"{name} must be a finite number, got {value!r}")


def check_max_gen_len(max_gen_len: object) -> int:
    """``max_gen_len`` as an int, refused unless an integer >= 0 (numpy's too, not a bool)."""
    if (
        isinstance(max_gen_len, bool)
        or not isinstance(max_gen_len, numbers.Integral)
        or max_gen_len < 0
    ):
        raise PromptError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
    return int(max_gen_len)


def _check_top_p(top_p: float) -> None:
    """A number in [0, 1] (0 keeps the most likely token alone, as in Meta's code)."""
    _check_number("top_p", top_p)
    if not 0 <= top_p <= 1:
        raise PromptError(f"top_p must be in [0, 1], got {top_p!r}")


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty on tokens marked in ``seen`` (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


# On the CPU, the top tokens tried first before sorting a whole row (see _sorted_head).
HEAD_FIRST = 64

Noise = Callable[[int], torch.Tensor]


def sample_top_p(
    probs: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | Noise | None = None,
) -> torch.Tensor:
    """Nucleus sampling over (B, V) probabilities; returns (B, 1) token ids (Meta's rule).

    ``torch.multinomial(probs, 1)`` picks ``argmax(probs / q)`` for (B, V) Exp(1) draws
    ``q``; so does this, over the sorted probabilities. ``noise`` gives those draws instead
    of ``generator`` (see :class:`MetaDraws`): a (B, V) tensor, or a function of ``w`` that
    returns the first ``w`` columns (all that nuclei within ``w`` tokens read).
    """
    if (
        not isinstance(probs, torch.Tensor)
        or not probs.is_floating_point()
        or probs.dim() not in (1, 2)
    ):
        got = (
            f"a {probs.dim()}-D {str(probs.dtype).removeprefix('torch.')} tensor"
            if isinstance(probs, torch.Tensor)
            else type(probs).__name__
        )
        raise PromptError(
            f"sample_top_p takes a floating-point tensor of probabilities, (batch, vocab) or "
            f"(vocab,), got {got}"
        )
    _check_top_p(p)
    return _sample_top_p(probs, p, generator, noise)


def _sample_top_p(
    probs: torch.Tensor,
    p: float,
    generator: torch.Generator | None,
    noise: torch.Tensor | Noise | None,
) -> torch.Tensor:
    """:func:`sample_top_p` on arguments already checked (each sampled step's path)."""
    cpu = probs.device.type == "cpu"
    if cpu and not bool(rows_finite(probs).all()):
        raise NumericalError(_NOT_FINITE)  # torch.multinomial's check, before any shortcut
    # The shortcuts (a partial sort, drawing only the noise a nucleus reads) pick torch's own
    # tokens for float32 probabilities, as sampling makes them, on the CPU; on an accelerator
    # the host would wait for the device to narrow the rows down.
    shortcut = cpu and probs.dtype == torch.float32 and probs.dim() == 2 and probs.numel() > 0
    shortcut = shortcut and probs.is_contiguous()  # multinomial's noise follows the layout
    shortcut = shortcut and (noise is not None or _serial_cpu(generator))
    head = head_idx = None
    if shortcut:
        head, head_idx = _sorted_head(probs, p)
    if head is None or head_idx is None:  # Meta's steps, in place: multinomial's noise follows
        probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # the layout
        probs_sort[torch.cumsum(probs_sort, dim=-1) - probs_sort > p] = 0.0
        total = probs_sort.sum(dim=-1, keepdim=True)
        if cpu:  # torch.multinomial's other checks, as a typed error
            _check_nucleus(probs_sort, total)
        probs_sort.div_(total)
        if noise is None:
            choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
        else:
            noise = noise(probs.shape[-1]) if callable(noise) else noise
            choice = torch.argmax(probs_sort / noise, dim=-1, keepdim=True)
        return torch.gather(probs_idx, -1, choice)
    probs_sort = head.masked_fill(torch.cumsum(head, dim=-1) - head > p, 0.0)
    padded = probs.new_zeros(probs.shape)  # summed as the whole row is: the same float
    padded[:, : head.shape[-1]] = probs_sort
    total = padded.sum(dim=-1, keepdim=True)
    _check_nucleus(probs_sort, total)  # torch.multinomial's other checks, on what it sees
    # Only the columns a row can pick: up to its last nonzero probability.
    width = int(torch.nonzero((probs_sort > 0).any(dim=0)).max()) + 1
    probs_sort = probs_sort[:, :width] / total
    if noise is None:
        gen = generator if generator is not None else torch.default_generator
        bsz, vocab = probs.shape
        noise = block_noise(gen, bsz, vocab, range(bsz), width, fast=True)
    elif callable(noise):
        noise = noise(width)
    else:
        noise = noise[:, :width]
    choice = torch.argmax(probs_sort / noise, dim=-1, keepdim=True)
    tokens = torch.gather(head_idx, -1, choice)
    _order_ties_as_sort(probs, head, choice, tokens)
    return tokens


def rows_finite(x: torch.Tensor) -> torch.Tensor:
    """Whether each row of ``x`` is free of NaN and inf. On the CPU by a row sum first (a
    NaN or inf makes it so; one pass instead of isfinite's three), checked one value at a time
    only if a sum is not finite, which an overflow alone could also make it."""
    if x.device.type == "cpu":
        ok = torch.isfinite(x.sum(dim=-1))
        if bool(ok.all()):
            return ok
    return torch.isfinite(x).all(dim=-1)


def _serial_cpu(generator: torch.Generator | None) -> bool:
    """Whether draws from ``generator`` (None: torch's default, a CPU one) can be drawn in
    part and passed over (see :func:`block_noise`)."""
    on_cpu = generator is None or generator.device.type == "cpu"
    return on_cpu and _cpu_draws_are_serial()


_NOT_FINITE = "sampling needs finite probabilities; got NaN or inf (softmax of broken logits?)"


def _check_nucleus(probs_sort: torch.Tensor, total: torch.Tensor) -> None:
    if bool((probs_sort < 0).any()):
        raise NumericalError("sampling needs probabilities >= 0 in the nucleus; got a negative one")
    if not bool((total > 0).all()):
        raise NumericalError("sampling needs each row's probabilities to sum to more than 0")


def _order_ties_as_sort(
    probs: torch.Tensor, head: torch.Tensor, choice: torch.Tensor, tokens: torch.Tensor
) -> None:
    """Give ``tokens`` the token that ``torch.sort`` puts at the chosen place where that
    place's probability is tied: ``topk`` may order equal values differently. The place
    itself is the sort's (same values, sums and draws); only which of the equal tokens
    sits there may differ. The last place of ``head`` may tie with a token beyond it."""
    width = head.shape[-1]
    at = head.gather(-1, choice)
    left = head.gather(-1, (choice - 1).clamp(min=0))
    right = head.gather(-1, (choice + 1).clamp(max=width - 1))
    tied = ((choice > 0) & (left == at)) | ((choice < width - 1) & (right == at))
    tied |= choice == width - 1
    rows = torch.nonzero(tied.view(-1)).view(-1)
    if rows.numel():
        order = torch.sort(probs[rows], dim=-1, descending=True).indices
        tokens[rows] = order.gather(-1, choice[rows])


def _sorted_head(
    probs: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """The first columns of ``torch.sort(probs, descending=True)``'s values that hold every
    row's nucleus, with ``topk``'s indices; (None, None) where whole rows should be sorted.

    Sorting (8, 32016) rows takes ~10 ms on a CPU, more than a decoding step of a small
    model, while a nucleus is mostly a few tokens: ``topk`` finds them in ~0.2 ms. Its
    values are the sort's, and so are the cumulative sums (a serial loop); equal values
    may come in another order (see :func:`_order_ties_as_sort`). A nucleus wider than
    HEAD_FIRST tokens is bounded by the tokens above a threshold whose mass exceeds ``p``,
    if they are few enough for ``topk`` to beat the sort. For CPU rows: the checks wait for
    the values (on an accelerator the sort is cheap).
    """
    vocab = probs.shape[-1]
    k = HEAD_FIRST
    if p >= 1.0:  # the nucleus is every token of nonzero probability, and a zero after
        k = int((probs > 0).sum(dim=-1).max()) + 1
    for attempt in range(2):
        if k > vocab // 4:  # topk would cost about what the sort does
            break
        vals, idx = torch.topk(probs, k, dim=-1)
        before = torch.cumsum(vals, dim=-1) - vals  # the mass before each token
        going_on = (before[:, -1:] <= p) & (vals[:, -1:] > 0)  # rows whose nucleus may go on
        if not bool(going_on.any()):
            return vals, idx
        if attempt == 0:
            k = _tokens_holding(probs, vals[:, -1:], going_on, p, vocab // 4)
    return None, None


def _tokens_holding(
    probs: torch.Tensor, last: torch.Tensor, rows: torch.Tensor, p: float, most: int
) -> int:
    """How many tokens (the most in any of ``rows``, a (B, 1) mask) have probability above a
    threshold whose mass exceeds ``p`` in each of them, trying thresholds below each row's
    ``last`` (> 0 in those rows); past ``most`` tokens, more than ``most``."""
    threshold = torch.where(rows, last, math.inf)  # other rows: no tokens, and no mass needed
    for _ in range(6):
        threshold /= 8
        above = probs >= threshold
        count = int(above.sum(dim=-1).max())
        if count > most:
            break
        # With a margin for the order of the sums: the nucleus is checked anyway.
        mass = torch.where(above, probs, 0.0).sum(dim=-1, keepdim=True)
        if bool(((mass > p + 1e-4) | ~rows).all()):
            return count
    return most + 1


def prompt_token_mask(prompt: torch.Tensor, lens: list[int], vocab: int) -> torch.Tensor:
    """(B, vocab) booleans: which tokens each row's prompt holds (not its padding), the
    tokens a repetition penalty applies to before any is generated."""
    seen = torch.zeros((prompt.shape[0], vocab), dtype=torch.bool, device=prompt.device)
    for i, n in enumerate(lens):
        seen[i, prompt[i, :n]] = True
    return seen


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    noise: torch.Tensor | Noise | None = None,
) -> torch.Tensor:
    """Pick one token per row of float32 ``logits`` (B, V); returns (B,) int64. ``noise``
    replaces the random draws (see :func:`sample_top_p`)."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    scores = logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A row whose probabilities are not finite (NaN/inf logits, or a temperature so small that
    # logits / temperature overflows) falls back to its argmax, the temperature -> 0 limit,
    # instead of failing inside torch.multinomial; callers check the logits themselves
    # (Llama raises NumericalError naming the step). On an accelerator without a host sync.
    ok = torch.isfinite(probs.sum(dim=-1, keepdim=True))  # a NaN anywhere makes it NaN
    if probs.device.type != "cpu" or not bool(ok.all()):
        best = torch.argmax(scores, dim=-1, keepdim=True)
        probs = torch.where(ok, probs, torch.zeros_like(probs).scatter_(-1, best, 1.0))
    if params.min_p > 0:
        floor = probs.amax(dim=-1, keepdim=True) * params.min_p
        probs = probs.masked_fill(probs < floor, 0.0)
    # Always through the sorted nucleus path (also for top_p == 1), as Meta's code does, so
    # that a seed draws the same tokens.
    return _sample_top_p(probs, params.top_p, generator, noise).view(-1)


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
        self.fast = _serial_cpu(generator)
        self.step = 0
        self.next_block = 0  # the generator is at the start of this block
        self.states: dict[int, torch.Tensor] = {}  # block -> generator state at its start

    @classmethod
    def for_batch(
        cls,
        generator: torch.Generator,
        order: list[int],
        lens: list[int],
        budgets: list[int],
        vocab: int,
    ) -> MetaDraws | None:
        """The draws for a batch whose row ``i`` is the caller's prompt ``order[i]`` (of
        ``lens[i]`` tokens, up to ``budgets[i]`` new ones); None if not affordable."""
        if not cls.affordable(lens, vocab):
            return None
        place = {i: p for p, i in enumerate(sorted(range(len(order)), key=order.__getitem__))}
        offsets = [n - min(lens) for n in lens]
        return cls(generator, [place[i] for i in range(len(order))], offsets, budgets, vocab)

    @staticmethod
    def affordable(lens: list[int], vocab: int) -> bool:
        """Whether catching up with Meta's draws over the spread of prompt lengths ``lens``
        stays within MAX_CATCH_UP_DRAWS. If not, a batch draws each step's noise afresh
        (still from its seeded generator), like a batch of equal lengths."""
        return (max(lens) - min(lens)) * len(lens) * vocab <= MAX_CATCH_UP_DRAWS

    def take(self, active: list[int], width: int | None = None) -> torch.Tensor:
        """This step's noise, (B, V) or its first ``width`` columns: row ``i`` of ``active``
        gets its Meta block's row; the other rows (finished) get ones, which pick their most
        likely token."""
        step = self.step
        self.step += 1
        bsz, vocab = self.shape
        width = vocab if width is None else width
        want: dict[int, list[int]] = {}  # block -> the active rows that take it now
        for i in active:
            want.setdefault(self.offsets[i] + step, []).append(i)
        lowest = min(want, default=-1)  # the block of the row furthest behind
        noise = torch.ones((bsz, width), dtype=torch.float32, device=self.generator.device)

        def rows_of_block(rows: list[int], whole: bool) -> None:
            places = [self.batch_rows[i] for i in rows]
            got = block_noise(self.generator, bsz, vocab, places, width, self.fast, whole)
            noise[rows] = got

        while want and self.next_block <= max(want):
            b = self.next_block
            self.next_block += 1
            if any(step <= b - self.offsets[i] < self.budgets[i] for i in active):
                self.states[b] = self.generator.get_state()
            if b in want:
                rows_of_block(want.pop(b), whole=True)  # drawn as it is passed
            else:
                block_noise(self.generator, bsz, vocab, [], 0, self.fast)
        now = self.generator.get_state()
        for b, rows in want.items():
            self.generator.set_state(self.states[b])
            rows_of_block(rows, whole=False)
        self.generator.set_state(now)
        for b in [b for b in self.states if b <= lowest]:
            del self.states[b]  # every row that takes it has (rows advance together)
        return noise


def block_noise(
    generator: torch.Generator,
    bsz: int,
    vocab: int,
    places: Sequence[int],
    width: int,
    fast: bool,
    whole: bool = True,
) -> torch.Tensor:
    """The first ``width`` columns of (distinct) rows ``places`` of the next (bsz, vocab) block of
    Exp(1) draws from ``generator``, as ``torch.multinomial`` draws it. ``whole`` leaves the
    generator past the block; otherwise it stops where it may (its caller resets it).

    ``fast`` (a CPU generator whose draws are serial, see :func:`_cpu_draws_are_serial`)
    draws only the columns asked for and passes the others as raw 64-bit numbers (4x
    cheaper than Exp(1) floats); otherwise the block is drawn whole.
    """
    if not fast:
        end = bsz * vocab if whole else (max(places, default=-1) + 1) * vocab
        drawn = torch.empty(end, dtype=torch.float32, device=generator.device)
        drawn.exponential_(1, generator=generator)
        return drawn.view(-1, vocab)[list(places), :width]
    out = torch.empty((len(places), width), dtype=torch.float32, device="cpu")
    done = 0  # draws of the block passed so far
    for j in sorted(range(len(places)), key=lambda j: places[j]):
        start = places[j] * vocab
        _pass_cpu(start - done, generator)
        out[j].exponential_(1, generator=generator)
        done = start + width
    if whole:
        _pass_cpu(bsz * vocab - done, generator)
    return out


def _pass_cpu(n: int, generator: torch.Generator) -> None:
    """Take ``n`` raw 64-bit numbers from CPU ``generator`` (n Exp(1) draws' worth)."""
    if n > 0:
        torch.empty(n, dtype=torch.int64, device="cpu").random_(generator=generator)


@functools.cache
def _cpu_draws_are_serial() -> bool:
    """Whether torch's CPU generator draws Exp(1) floats one 64-bit number each, in order,
    as :func:`_pass_cpu` takes them, for short draws as for long ones (so that passing n
    draws can be done by it, and a block's row r, or its first columns, is what follows r
    rows of draws)."""
    n = 40_000
    whole = torch.Generator().manual_seed(20231)
    block = torch.empty(3, n, dtype=torch.float32, device="cpu").exponential_(1, generator=whole)
    parts = torch.Generator().manual_seed(20231)
    pieces = []
    _pass_cpu(n, parts)
    for size, skip in ((1, 0), (7, 1), (64, 0), (1024, 3), (n - 1100, 0)):
        _pass_cpu(skip, parts)
        pieces.append(torch.full((skip,), math.nan, dtype=torch.float32, device="cpu"))
        draws = torch.empty(size, dtype=torch.float32, device="cpu")
        pieces.append(draws.exponential_(1, generator=parts))
    _pass_cpu(n, parts)
    middle = torch.cat(pieces)
    drawn = ~middle.isnan()
    return torch.equal(block[1][drawn], middle[drawn]) and torch.equal(
        whole.get_state(), parts.get_state()
    )
