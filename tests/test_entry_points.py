"""Every script keeps gdro.py's promise: `--help` works, and a bad input is refused before anything loads, in one line
on stderr (exit code 2, no traceback). Marked slow: each is a new Python process (2 s of imports); every refusal
happens before any model is built."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent
SCRIPTS = {  # the command, and one bad input for it with a word its refusal must say (the experiments' scripts:
    # tests/test_experiment.py)
    "gdro.py": ([sys.executable, "gdro.py"], ["--prompts", "missing.txt"], "missing.txt"),
    "eval.py": ([sys.executable, "eval.py"], ["--prompts", "missing.txt"], "missing.txt"),
    "reward_ocr.py": ([sys.executable, "reward_ocr.py"], ["missing.png", 'a sign that reads "Hi"'], "missing.png"),
    "reward_geneval.py": ([sys.executable, "reward_geneval.py"], ["missing.png", "a photo of a dogg"], "dogg"),
    "experiments.geneval_prompts": ([sys.executable, "-m", "experiments.geneval_prompts"], ["--out", "x"],
                                    "unrecognized arguments: --out x"),
}


def run(command, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=HERE, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_script_answers_help(script):
    command, _, _ = SCRIPTS[script]
    result = run(command, ["--help"])
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr[-500:]


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_script_refuses_a_bad_input_in_one_line_with_exit_code_2(script):
    command, bad, word = SCRIPTS[script]
    result = run(command, bad)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-800:]
    assert lines[0].startswith("error: ") and word in lines[0], lines
