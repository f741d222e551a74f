"""Several processes (torchrun) give what one process gives: the same rollout cache, shard by shard, and the same LoRA.

Every run is a real command line in a subprocess: `python gdro.py ...` for one process and torchrun's module form
`python -m torch.distributed.run --nproc_per_node=2 gdro.py ...` (gloo on CPU) for two. One thread per process, so
the processes do not fight over the cores and the rollouts are bit for bit reproducible.

Run: pytest -q tests/test_distributed.py   (about 2 minutes on 2 cores: each process spends most of it importing)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gdro

pytestmark = pytest.mark.slow

GDRO = str(Path(gdro.__file__).resolve())
PROMPTS = ['a shop sign that reads "Open Late"', 'a mug printed with "Coffee 42"', 'a neon sign saying "Bar"',
           'a cake with "Happy Birthday Ana"']
# a cheap reward that fails on the prompt named by an environment variable: a build can be stopped on purpose while
# the reward file, whose sha256 the cache manifest records, stays the same
REWARD = '''
import os
import numpy as np
def brightness(images, prompts):
    if prompts[0] == os.environ.get("FAIL_ON_PROMPT"):
        raise RuntimeError("failing on purpose")
    return [float(np.asarray(im, dtype=np.float32).mean() / 255) for im in images]
'''
N_PROMPTS, STEPS = len(PROMPTS), 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "reward.py").write_text(REWARD)
    return d


def gdro_run(files, out, *flags, processes=1, fail_on_prompt=None):
    """One command line; returns (exit code, stdout + stderr)."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fail_on_prompt is not None:
        env["FAIL_ON_PROMPT"] = PROMPTS[fail_on_prompt]
    # 4 groups per step: micro-batches of one, four in one process, two in each of two (accumulated, then averaged)
    cmd = [*launcher, GDRO, "--tiny", "--prompts", str(files / "prompts.txt"), "--out", str(out),
           "--reward", f"{files / 'reward.py'}:brightness", "--max-prompts", str(N_PROMPTS),
           "--images-per-prompt", "6", "--group-size", "4", "--groups-per-step", "4", *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(GDRO).parent)
    return done.returncode, done.stdout + done.stderr


def ok(result):
    code, output = result
    assert code == 0, output[-3000:]
    return output


def shards(out):
    return [load_file(gdro.shard_path(out / "cache", i)) for i in range(N_PROMPTS)]


def assert_same_cache(a, b):
    for i, (x, y) in enumerate(zip(shards(a), shards(b))):
        assert x.keys() == y.keys(), i
        for k in x:
            assert torch.equal(x[k], y[k]), f"prompt {i}: {k}"


def assert_same_lora(a, b):
    x, y = load_file(a / "lora" / gdro.LORA_FILE), load_file(b / "lora" / gdro.LORA_FILE)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], msg=lambda m: f"{k}: {m}")


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(files):
    """The reference: one process builds the cache and trains STEPS steps."""
    out = files / "one_process"
    ok(gdro_run(files, out, "--max-steps", str(STEPS)))
    return out


def test_two_processes_build_the_same_cache_and_end_with_the_same_lora(files, one_process):
    out = files / "two_processes"
    output = ok(gdro_run(files, out, "--max-steps", str(STEPS), processes=2))
    assert_same_cache(one_process, out)
    assert_same_lora(one_process, out)
    # rank 0 alone speaks and writes
    assert output.count("LoRA saved to") == output.count("plan: ") == 1
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    # the logged means are the whole step's, all processes' groups together, logged once
    (line,), (expected,) = metrics(out), metrics(one_process)
    assert line.keys() == expected.keys() and line["step"] == STEPS
    for k in line.keys() - {"time_s"}:
        assert line[k] == pytest.approx(expected[k], rel=1e-4), k


def test_a_run_stopped_and_resumed_in_other_world_sizes_equals_the_straight_run(files, one_process):
    out = files / "stopped"
    # the cache build stops on prompt 3 while two processes share the prompts
    code, output = gdro_run(files, out, "--max-steps", str(STEPS), processes=2, fail_on_prompt=2)
    assert code != 0 and "failed on prompt 3" in output
    cached = {i: gdro.shard_path(out / "cache", i).stat().st_mtime_ns
              for i in range(N_PROMPTS) if gdro.shard_path(out / "cache", i).exists()}
    assert 0 in cached and 2 not in cached
    # one process finishes the cache and trains half the steps
    ok(gdro_run(files, out, "--max-steps", str(STEPS // 2), "--save-every", str(STEPS // 2)))
    assert {i: gdro.shard_path(out / "cache", i).stat().st_mtime_ns for i in cached} == cached  # kept, not redone
    assert_same_cache(one_process, out)
    # two processes resume training from its checkpoint
    ok(gdro_run(files, out, "--max-steps", str(STEPS), "--save-every", str(STEPS // 2), "--resume", processes=2))
    assert_same_lora(one_process, out)
    assert [line["step"] for line in metrics(out)] == [STEPS // 2, STEPS]
