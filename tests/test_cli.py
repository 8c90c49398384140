"""Command lines refuse options they do not have before doing any work (fire alone would run
with its defaults first and complain after)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from codellama.cli import check_generation_options, unknown_options
from codellama.errors import PromptError

from .conftest import GQA_ARGS, REPO


def cmd(ckpt_dir: str, tokenizer_path: str, temperature: float = 0.2, overwrite: bool = False):
    """A stand-in command with the shapes of options the tools have."""


def test_known_options_in_every_spelling_fire_takes_pass():
    argv = ["--ckpt_dir", "d", "--tokenizer-path=t", "--temperature", "-0.5", "--overwrite"]
    assert unknown_options(cmd, argv) == ""
    assert unknown_options(cmd, ["d", "t", "--nooverwrite"]) == ""
    assert unknown_options(cmd, ["-c", "d", "--tokenizer_path", "t"]) == ""  # the one c option


def test_a_misspelt_option_is_named_with_the_closest_one():
    problem = unknown_options(cmd, ["--ckpt_dir", "d", "--temprature", "0"])
    assert problem.startswith("unknown option '--temprature' (did you mean --temperature?)")
    assert "--tokenizer_path" in problem  # the options are listed


def test_a_misspelt_option_with_its_value_after_equals_is_named_without_the_value():
    problem = unknown_options(cmd, ["--overwite=True"])
    assert problem.startswith("unknown option '--overwite' (did you mean --overwrite?)")


def test_a_value_too_many_is_refused():
    problem = unknown_options(cmd, ["d", "t", "0.5", "--overwrite", "False", "extra"])
    assert problem.startswith("unexpected value(s) ['extra']")


def test_help_and_fires_own_flags_after_a_bare_double_dash_are_left_to_fire():
    assert unknown_options(cmd, ["--help"]) == ""
    assert unknown_options(cmd, ["d", "t", "--", "--trace"]) == ""


def test_a_command_of_a_dict_is_checked_against_its_own_options():
    commands = {"to_hf": cmd}
    assert unknown_options(commands, ["to_hf", "d", "t"]) == ""
    assert "unknown option '--tempreture'" in unknown_options(commands, ["to_hf", "--tempreture"])
    assert unknown_options(commands, ["to_nowhere", "--x"]) == ""  # fire lists the commands


@pytest.mark.parametrize("script", ["example_completion.py", "-m codellama.humaneval"])
def test_a_tool_with_a_misspelt_option_stops_before_building(tmp_path, make_checkpoint, script):
    ckpt = make_checkpoint(GQA_ARGS)
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"task_id": "t/0", "prompt": "def f():\\n"}\n')
    out = tmp_path / "samples.jsonl"
    extra = ["--problems", str(problems), "--out", str(out)] if "humaneval" in script else []
    args = [sys.executable, *script.split(), "--ckpt_dir", str(ckpt), "--tokenizer_path",
            str(ckpt / "tokenizer.model"), *extra, "--temprature", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown option '--temprature' (did you mean --temperature?)" in proc.stderr
    assert "Loaded in" not in proc.stdout  # nothing was built
    assert not out.exists()


@pytest.mark.parametrize(
    "script, option, value, error",
    [
        ("example_completion.py", "--top_p", "2", "PromptError: top_p must be in [0, 1], got 2"),
        ("example_infilling.py", "--temperature", "-1", "PromptError: temperature must be >= 0"),
        ("example_instructions.py", "--max_gen_len", "-5",
         "PromptError: max_gen_len must be an integer >= 0, got -5"),
    ],
)  # fmt: skip
def test_an_example_refuses_a_bad_sampling_option_before_building(
    tmp_path, script, option, value, error
):
    """The check comes before the build (minutes for 34B/70B): here the checkpoint does
    not even exist, so an error about it would mean the build ran first."""
    args = [sys.executable, script, "--ckpt_dir", str(tmp_path / "no-ckpt"), "--tokenizer_path",
            str(tmp_path / "no.model"), option, value]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert error in proc.stderr


def test_check_generation_options_takes_what_generation_takes():
    check_generation_options(0, 1, None)
    check_generation_options(0.2, 0.95, 0)
    with pytest.raises(PromptError, match="top_p must be in"):
        check_generation_options(0.2, -0.5, 16)
