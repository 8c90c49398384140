"""The HumanEval entry point: problems in, one completion per sample out."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codellama import (
    ConfigError,
    DataNotFoundError,
    Llama,
    OutputExistsError,
    OutputNotWritableError,
    PromptError,
    PromptTooLongError,
)
from codellama.generation import GenerationResult
from codellama.humaneval import (
    HUMANEVAL_STOP,
    finished_samples,
    generate_samples,
    main,
    partial_path,
    read_problems,
    settings_path,
    write_samples,
)

from .conftest import GQA_ARGS, REPO

PROBLEMS = [
    {"task_id": "T/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n', "test": "x"},
    {"task_id": "T/1", "prompt": "def is_even(n: int) -> bool:\n"},
    {"task_id": "T/2", "prompt": "from typing import List\n\n\ndef total(xs: List[int]):\n"},
]


def _write(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama(make_checkpoint) -> Llama:
    ckpt = make_checkpoint(GQA_ARGS)
    return Llama.build(
        str(ckpt), str(ckpt / "tokenizer.model"), 128, 2, device="cpu", dtype="float32"
    )


@pytest.mark.parametrize("gz", [False, True])
def test_problems_are_read_in_file_order_from_jsonl_and_gz(tmp_path, gz):
    path = _write(tmp_path / ("p.jsonl.gz" if gz else "p.jsonl"), PROBLEMS, gz=gz)
    assert read_problems(path) == PROBLEMS


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"task_id": "a"}'], "line 1: 'prompt' must be a string"),
        (['{"task_id": "a", "prompt": "x"}', "[1, 2]"], "line 2: expected a JSON object"),
        (['{"task_id": "a", "prompt": "x"}'] * 2, "line 2: task_id 'a' appears twice"),
        (["{not json"], "is not a JSON-lines problems file"),
        ([""], "holds no problems"),
        (
            ['{"task_id": "a/1", "prompt": "x\\ud800"}'],
            "line 1: the prompt of task 'a/1' holds '\\\\ud800' at offset 1, a lone surrogate",
        ),
    ],
)
def test_malformed_problem_files_are_refused_with_the_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptError, match=match):
        read_problems(path)


@pytest.mark.parametrize("flag", ["problems", "out"])
@pytest.mark.parametrize(
    "value, got", [(123, "got int: 123 .a command line reads a name of digits"), (True, "got bool")]
)
def test_a_path_option_given_a_number_or_no_value_is_a_config_error(tmp_path, flag, value, got):
    args = {"problems": str(_write(tmp_path / "p.jsonl", PROBLEMS)), "out": str(tmp_path / "s")}
    args[flag] = value  # `--out 123`, or a bare `--out`
    with pytest.raises(ConfigError, match=f"--{flag} must be a file path .*{got}"):
        main(str(tmp_path / "no-ckpt"), str(tmp_path / "no.model"), **args)


def test_missing_problems_file_is_data_not_found(tmp_path):
    with pytest.raises(DataNotFoundError, match="nope.jsonl"):
        read_problems(tmp_path / "nope.jsonl")


def test_each_sample_is_the_completion_cut_at_the_first_stop_string(llama):
    samples = list(generate_samples(llama, PROBLEMS, n_samples=2, temperature=0.0, max_gen_len=24))
    assert [s["task_id"] for s in samples] == ["T/0", "T/0", "T/1", "T/1", "T/2", "T/2"]
    tok = llama.tokenizer
    for s, p in zip(samples, [p for p in PROBLEMS for _ in range(2)], strict=True):
        prompt = tok.encode(p["prompt"], bos=True, eos=False)
        free = llama.generate(
            [prompt], 24, temperature=0.0, stop_strings=HUMANEVAL_STOP
        )[0][0]  # fmt: skip
        text = tok.decode(prompt + free)[len(tok.decode(prompt)) :]  # the exact continuation
        cuts = [i for i in (text.find(stop) for stop in HUMANEVAL_STOP) if i >= 0]
        assert s["completion"] == (text[: min(cuts)] if cuts else text)


class _Scripted:
    """A stand-in for Llama whose every row generates ``tokens``."""

    def __init__(self, tokenizer, tokens):
        self.tokenizer, self.tokens = tokenizer, tokens
        self.max_batch_size, self.max_seq_len = 4, 1024

    def generate_results(self, prompt_tokens, max_gen_len, sampling, **kwargs):
        return [GenerationResult(list(self.tokens), None, "stop", len(p)) for p in prompt_tokens]


def test_completion_keeps_the_indentation_sentencepiece_drops_when_decoding(meta_tokenizer):
    prompt = 'def add(a, b):\n    """Return a + b."""\n'
    body = "    return a + b\n"
    ids = meta_tokenizer.encode(prompt + body, bos=False, eos=False)
    generated = ids[len(meta_tokenizer.encode(prompt, bos=False, eos=False)) :]
    assert meta_tokenizer.token_piece(generated[0]) == "▁▁▁"  # decode() would drop a space
    problems = [{"task_id": "T/0", "prompt": prompt}]
    [sample] = generate_samples(_Scripted(meta_tokenizer, generated), problems)
    assert sample["completion"] == body
    scope: dict = {}
    exec(prompt + sample["completion"], scope)
    assert scope["add"](2, 3) == 5


def test_a_single_stop_string_is_one_stop_not_its_characters(llama):
    [sample] = generate_samples(
        _Scripted(llama.tokenizer, llama.tokenizer.encode("x = 1\ndef g", False, False)),
        PROBLEMS[:1], stop="\ndef",
    )  # fmt: skip
    assert sample["completion"] == " x = 1"  # with the leading space encode() put there


def test_a_problem_without_a_prompt_is_refused_by_name(llama):
    with pytest.raises(PromptError, match="problem 1: 'prompt' must be a string"):
        list(generate_samples(llama, [PROBLEMS[0], {"task_id": "T/9"}]))


def test_samples_are_written_as_json_lines_and_existing_output_is_kept(tmp_path):
    out = tmp_path / "samples.jsonl"
    rows = [{"task_id": "T/0", "completion": "    return a + b\n"}]
    assert write_samples(iter(rows), out) == 1
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert not (tmp_path / "samples.jsonl.partial").exists()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_samples(iter(rows), out)
    assert json.loads(out.read_text()) == rows[0]


def test_finished_samples_are_the_complete_lines_in_problem_order(tmp_path):
    out = tmp_path / "samples.jsonl"
    good = [{"task_id": t, "completion": f"c{i}"} for i, t in enumerate(["T/0", "T/0", "T/1"])]
    lines = [json.dumps(x) + "\n" for x in good]
    partial_path(out).write_text("".join(lines) + '{"task_id": "T/1", "compl')  # cut short
    assert finished_samples(out, PROBLEMS, n_samples=2) == good
    partial_path(out).write_text(lines[0] + json.dumps({"task_id": "T/2", "completion": ""}))
    assert finished_samples(out, PROBLEMS, n_samples=2) == good[:1]
    assert finished_samples(tmp_path / "other.jsonl", PROBLEMS, n_samples=2) == []


# The arguments of main for a run of PROBLEMS on the tiny checkpoint.
RUN = dict(n_samples=2, temperature=0.0, max_gen_len=8, max_seq_len=128, max_batch_size=2,
           device="cpu", dtype="float32")  # fmt: skip


class _Interrupted:
    """A stand-in for Llama that generates ``batches`` batches with ``model``, then stops
    as Ctrl-C would."""

    def __init__(self, model, batches=1):
        self.model, self.batches, self.tokenizer = model, batches, model.tokenizer
        self.max_batch_size, self.max_seq_len = model.max_batch_size, model.max_seq_len

    def generate_results(self, *args, **kwargs):
        if self.batches == 0:
            raise KeyboardInterrupt
        self.batches -= 1
        return self.model.generate_results(*args, **kwargs)


def _run(monkeypatch, model, ckpt, problems, out, **args):
    """main(...) with ``model`` (a stand-in) for what Llama.build would return."""
    with monkeypatch.context() as m:
        m.setattr(Llama, "build", staticmethod(lambda *a, **k: model))
        main(str(ckpt), str(ckpt / "tokenizer.model"), str(problems), str(out), **{**RUN, **args})


def _interrupt(monkeypatch, model, ckpt, problems, out, **args):
    """Run main until its first batch is written, then interrupt it."""
    with pytest.raises(KeyboardInterrupt):
        _run(monkeypatch, _Interrupted(model), ckpt, problems, out, **args)
    assert partial_path(out).is_file() and settings_path(out).is_file()


@pytest.fixture
def interrupted(make_checkpoint, llama, tmp_path, monkeypatch):
    """(checkpoint, problems file, output) of a run interrupted after its first batch."""
    ckpt = make_checkpoint(GQA_ARGS)
    problems = _write(tmp_path / "p.jsonl", PROBLEMS)
    out = tmp_path / "samples.jsonl"
    _interrupt(monkeypatch, llama, ckpt, problems, out)
    return ckpt, problems, out


def _refuse_build(*args, **kwargs):
    raise AssertionError("Llama.build was called: the run should have been refused before it")


def test_an_interrupted_run_resumes_where_it_stopped(make_checkpoint, llama, tmp_path, monkeypatch):
    ckpt = make_checkpoint(GQA_ARGS)
    problems = _write(tmp_path / "p.jsonl", PROBLEMS)
    full = list(generate_samples(llama, PROBLEMS, n_samples=2, temperature=0.0, max_gen_len=8))
    out = tmp_path / "samples.jsonl"
    _interrupt(monkeypatch, llama, ckpt, problems, out)
    with open(partial_path(out), "a") as f:
        f.write('{"task')  # a line cut short
    assert partial_path(out).read_text().splitlines()[:2] == [json.dumps(x) for x in full[:2]]
    assert list(generate_samples(llama, PROBLEMS, 2, 0.0, max_gen_len=8, skip=3)) == full[3:]
    main(str(ckpt), str(ckpt / "tokenizer.model"), str(problems), out=str(out), **RUN)
    assert [json.loads(line) for line in out.read_text().splitlines()] == full
    assert not partial_path(out).exists()
    assert not settings_path(out).exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"temperature": 0.5}, "--temperature was 0.0, now 0.5"),
        ({"seed": 2}, "--seed was 1, now 2"),
        ({"ckpt_dir": "other"}, "--ckpt_dir was '.*', now '.*other'"),
        ({"problems": PROBLEMS[:1] + [{**PROBLEMS[1], "prompt": "def f():\n"}] + PROBLEMS[2:]},
         "--problems was '[0-9a-f]+', now '[0-9a-f]+' \\(a digest of its task ids and prompts"),
    ],
    ids=["temperature", "seed", "ckpt_dir", "problems"],
)  # fmt: skip
def test_resuming_with_other_settings_is_refused_before_the_build(
    interrupted, tmp_path, monkeypatch, change, match
):
    ckpt, problems, out = interrupted
    before = partial_path(out).read_bytes(), settings_path(out).read_bytes()
    monkeypatch.setattr(Llama, "build", staticmethod(_refuse_build))
    args = {**RUN, **{k: v for k, v in change.items() if k not in ("ckpt_dir", "problems")}}
    if "problems" in change:
        problems = _write(tmp_path / "p2.jsonl", change["problems"])
    ckpt_dir = tmp_path / change["ckpt_dir"] if "ckpt_dir" in change else ckpt
    with pytest.raises(ConfigError, match=match) as err:
        main(str(ckpt_dir), str(ckpt / "tokenizer.model"), str(problems), str(out), **args)
    assert "Rerun with the same arguments to resume it, or pass --overwrite" in str(err.value)
    assert (partial_path(out).read_bytes(), settings_path(out).read_bytes()) == before


def test_overwrite_starts_afresh_and_records_the_new_settings(interrupted, llama, monkeypatch):
    ckpt, problems, out = interrupted
    scripted = _Scripted(llama.tokenizer, llama.tokenizer.encode("x = 1", False, False))
    scripted.max_batch_size = 2
    _interrupt(monkeypatch, scripted, ckpt, problems, out, temperature=0.5, overwrite=True)
    assert [json.loads(x)["completion"] for x in partial_path(out).read_text().splitlines()] == [
        " x = 1"
    ] * 2  # the first run's samples are gone
    _run(monkeypatch, scripted, ckpt, problems, out, temperature=0.5)  # resumes, not refused
    assert [json.loads(x)["completion"] for x in out.read_text().splitlines()] == [" x = 1"] * 6
    assert not settings_path(out).exists()


@pytest.mark.parametrize(
    "sidecar, match",
    [(None, "is missing"), ("{not json", "cannot be read"), ("[1]", "--ckpt_dir was '\\(not")],
    ids=["missing", "not-json", "not-an-object"],
)
def test_a_partial_without_readable_settings_is_refused(interrupted, monkeypatch, sidecar, match):
    ckpt, problems, out = interrupted
    if sidecar is None:
        settings_path(out).unlink()
    else:
        settings_path(out).write_text(sidecar)
    before = partial_path(out).read_bytes()
    monkeypatch.setattr(Llama, "build", staticmethod(_refuse_build))
    with pytest.raises(ConfigError, match=match) as err:
        main(str(ckpt), str(ckpt / "tokenizer.model"), str(problems), str(out), **RUN)
    assert "pass --overwrite to start afresh" in str(err.value)
    assert partial_path(out).read_bytes() == before


@pytest.mark.parametrize("where", ["proc", "read-only"])
def test_an_unwritable_out_folder_is_refused_before_the_build(
    tmp_path, tokenizer_path, monkeypatch, where
):
    problems = _write(tmp_path / "p.jsonl", PROBLEMS)
    out = "/proc/samples.jsonl"
    if where == "read-only":  # what a folder without write permission gives a non-root user
        out = str(tmp_path / "samples.jsonl")
        partial_path(tmp_path / "samples.jsonl").write_text("kept\n")

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("tempfile.mkstemp", refuse)
    elif not os.path.isdir("/proc"):
        pytest.skip("no /proc on this system")
    monkeypatch.setattr(Llama, "build", staticmethod(_refuse_build))
    with pytest.raises(OutputNotWritableError, match=f"--out '{out}'.*choose a folder you can"):
        main(str(tmp_path / "no-ckpt"), str(tokenizer_path), str(problems), out)
    if where == "read-only":
        assert partial_path(tmp_path / "samples.jsonl").read_text() == "kept\n"


def test_write_samples_refuses_a_partial_it_cannot_open_by_the_output_name():
    with pytest.raises(OutputNotWritableError, match="--out '/proc/s.jsonl'.*choose a folder"):
        write_samples([{"task_id": "T/0", "completion": "x"}], Path("/proc/s.jsonl"))


@pytest.mark.slow
def test_command_line_writes_one_line_per_sample(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(GQA_ARGS)
    problems = _write(tmp_path / "p.jsonl", PROBLEMS)
    out = tmp_path / "samples.jsonl"
    cmd = [sys.executable, "-m", "codellama.humaneval", "--ckpt_dir", str(ckpt),
           "--tokenizer_path", str(ckpt / "tokenizer.model"), "--problems", str(problems),
           "--out", str(out), "--n_samples", "2", "--temperature", "0", "--max_gen_len", "8",
           "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["task_id"] for x in lines] == ["T/0", "T/0", "T/1", "T/1", "T/2", "T/2"]
    assert all(isinstance(x["completion"], str) for x in lines)
    assert "wrote 6 samples for 3 problems" in proc.stdout


@pytest.mark.parametrize(
    "args, error, match",
    [
        ({"n_samples": 0}, PromptError, "n_samples must be a positive integer"),
        ({"temperature": -1}, PromptError, "temperature must be >= 0"),
        ({"top_p": 2}, PromptError, "top_p must be in"),
        ({"max_gen_len": -1}, PromptError, "max_gen_len must be a positive integer"),
        ({"out": "{tmp}/nodir/o.jsonl"}, DataNotFoundError, "create '.*nodir' first"),
        ({"out": "{tmp}"}, ConfigError, "is a directory; give a file path"),
    ],
    ids=["n_samples", "temperature", "top_p", "max_gen_len", "out-folder-missing", "out-dir"],
)
def test_bad_arguments_are_refused_before_the_model_is_built(tmp_path, args, error, match):
    problems = _write(tmp_path / "p.jsonl", PROBLEMS)
    out = args.pop("out", "{tmp}/s.jsonl").format(tmp=tmp_path)
    with pytest.raises(error, match=match):  # the checkpoint does not exist: never reached
        main(str(tmp_path / "no-ckpt"), str(tmp_path / "no.model"), str(problems), out, **args)
    assert not list(tmp_path.glob("*.partial"))


def test_a_prompt_too_long_is_named_by_task_before_the_model_is_built(tmp_path, tokenizer_path):
    rows = [*PROBLEMS, {"task_id": "T/long", "prompt": "x = 1\n" * 200}]
    problems = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(PromptTooLongError, match="problem 'T/long' has a .*max_seq_len is 64"):
        main(str(tmp_path / "no-ckpt"), str(tokenizer_path), str(problems), max_seq_len=64)


def test_a_prompt_too_long_is_refused_before_any_sample_is_made(tokenizer):
    class Counting(_Scripted):
        calls = 0

        def generate_results(self, *args, **kwargs):
            Counting.calls += 1
            return super().generate_results(*args, **kwargs)

    llama = Counting(tokenizer, [])
    llama.max_seq_len = 16
    rows = [{"task_id": "T/0", "prompt": "x"}, {"task_id": "T/long", "prompt": "x = 1\n" * 40}]
    with pytest.raises(PromptTooLongError, match="'T/long'"):
        list(generate_samples(llama, rows))
    assert Counting.calls == 0


def test_the_problems_file_is_refused_as_the_output(tmp_path, tokenizer_path):
    problems = _write(tmp_path / "p.jsonl", PROBLEMS)
    before = problems.read_text()
    with pytest.raises(ConfigError, match="is the problems file itself"):
        main(str(tmp_path / "no-ckpt"), str(tokenizer_path), str(problems), str(problems),
             overwrite=True)  # fmt: skip
    assert problems.read_text() == before


def test_an_empty_existing_output_file_is_not_data_to_keep(tmp_path):
    out = tmp_path / "s.jsonl"
    out.write_text("")
    assert write_samples([{"task_id": "T/0", "completion": "x"}], out) == 1
