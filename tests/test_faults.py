"""Fault injection: what a user sees when an input is bad, or when a run is killed, interrupted or runs out of disk.

Bad inputs are refused in one line naming the flag, file or line, exit code 2, before any model loads or any file is
written. A run that is killed (SIGKILL), interrupted (Ctrl-C = SIGINT) or stopped by a full disk at any point keeps its
finished cache shards and its last complete checkpoint, and the same command run again (with --resume once training
has started) ends with exactly the cache, LoRA and metrics of an uninterrupted run.

The faults are real: a child process running `python gdro.py ...` sends itself SIGKILL or SIGINT, or gets an
OSError(ENOSPC), at a chosen call of os.replace, open, Path.unlink or a training step's backward, i.e. at a chosen
point of a shard write, a checkpoint save or a training step; nothing in gdro.py knows about it. The children fork
from one Python process that imported torch and diffusers once, so a run costs seconds instead of ~15 s of imports.
"""
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gdro

HERE = Path(__file__).resolve().parent.parent  # the repository
REWARD = f"{HERE / 'experiments' / 'toy_reward.py'}:colour_reward"
PROMPTS = "a red ball\na green tree\na blue sky\na red car\n"
# a tiny run: 3 prompts of 6 images, 4 steps, a checkpoint every 2 steps (and at the last), a metrics line per step
BASE = ["--tiny", "--reward", REWARD, "--max-prompts", "3", "--images-per-prompt", "6", "--max-steps", "4",
        "--groups-per-step", "2", "--save-every", "2", "--log-every", "1"]
RUN_TIMEOUT_S = 120
BACKWARD = "torch.Tensor.backward"  # called once per group in training (--groups-per-step 2, one group per pass)
IN_STEP_3 = [2 * 2 + 1]  # the first backward of step 3


def shard_tmp(i):
    """The temporary file that write_atomic renames into cache shard i."""
    return f".{gdro.shard_path('', i).name}.tmp"


def checkpoint_tmp(step):
    """The temporary folder that save_checkpoint renames into checkpoints/step_NNNNNN."""
    return f".step_{step:06d}.tmp"


def fault(call, suffix="", when="before", do="SIGKILL", calls=(1,)):
    """Just before (or after) the Nth call of `call` whose first argument ends with `suffix`, N in `calls`: send this
    process the signals in `do` ("SIGINT+SIGINT" = Ctrl-C twice) or raise OSError(errno `do`) instead of the call."""
    return dict(call=call, suffix=suffix, when=when, do=do, calls=list(calls))


DRIVER = r'''
"""Reads jobs (JSON lines) on stdin; runs each in a forked child as `python gdro.py ARGV` with its faults injected;
answers its exit code (negative: killed by that signal) or "timeout"."""
import builtins, errno, json, os, pathlib, runpy, signal, sys, time
import torch
import families
import gdro
import peft
gdro.load_more_families()  # all six
for family in gdro.FAMILIES:
    families.build_tiny_pipeline(gdro.FAMILIES[family])  # imports diffusers and transformers once, before the forks

OWNERS = {"os": os, "builtins": builtins, "pathlib.Path": pathlib.Path, "torch.Tensor": torch.Tensor}


def inject(call, suffix, when, do, calls):
    owner, name = call.rsplit(".", 1)
    owner = OWNERS[owner]
    real, seen = getattr(owner, name), []

    def fire():
        for action in do.split("+"):
            if action.startswith("SIG"):
                os.kill(os.getpid(), getattr(signal, action))
            else:
                raise OSError(getattr(errno, action), os.strerror(getattr(errno, action)))

    def wrapper(*args, **kwargs):
        hit = False
        if not suffix or (args and str(args[0]).endswith(suffix)):
            seen.append(1)
            hit = len(seen) in calls
        if hit and when == "before":
            fire()
        result = real(*args, **kwargs)
        if hit and when == "after":
            fire()
        return result

    setattr(owner, name, wrapper)


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: output to files, faults in, then gdro.py's own __main__; exits as Python does
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        for f in job["faults"]:
            inject(**f)
        sys.argv = [gdro.__file__, *job["argv"]]
        runpy.run_path(gdro.__file__, run_name="__main__")
        sys.exit(0)
    deadline = time.time() + job["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    print(json.dumps("timeout" if time.time() > deadline else os.waitstatus_to_exitcode(status)), flush=True)
'''

Run = namedtuple("Run", "code out err")


@pytest.fixture(scope="module")
def gdro_cli(tmp_path_factory):
    """run(out, *flags, faults=[]) -> Run(exit code, stdout, stderr) of `python gdro.py --prompts P BASE --out out
    *flags` in a child process, with the faults injected."""
    d = tmp_path_factory.mktemp("faults")
    (d / "driver.py").write_text(DRIVER)
    (d / "prompts.txt").write_text(PROMPTS)
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    driver = subprocess.Popen([sys.executable, str(d / "driver.py")], cwd=HERE, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    jobs = itertools.count()

    def run(out, *flags, faults=()):
        log = d / f"run{next(jobs)}"
        argv = ["--prompts", str(d / "prompts.txt"), *BASE, "--out", str(out), *flags]
        job = dict(argv=argv, faults=list(faults), stdout=f"{log}.out", stderr=f"{log}.err", timeout=RUN_TIMEOUT_S)
        driver.stdin.write(json.dumps(job) + "\n")
        driver.stdin.flush()
        reply = driver.stdout.readline()
        assert reply, "the driver process died"
        code = json.loads(reply)
        assert code != "timeout", f"gdro.py {' '.join(argv)} ran past {RUN_TIMEOUT_S} s"
        return Run(code, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text())

    yield run
    driver.stdin.close()
    driver.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(gdro_cli, tmp_path_factory):
    """The uninterrupted run that every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run = gdro_cli(out)
    assert run.code == 0, run.err
    return out


def with_cache(reference, tmp_path):
    """A fresh --out holding the reference's finished cache: faults in training skip the rollouts."""
    out = tmp_path / "run"
    shutil.copytree(reference / "cache", out / "cache")
    return out


def last_line(run):
    """The last line on stderr (progress bars redraw with \r)."""
    return re.split(r"[\r\n]+", run.err.strip())[-1]


def assert_one_line_error(run, *words):
    """Stopped with a non-zero exit code and one line that names the cause, no traceback."""
    assert run.code not in (0, -signal.SIGKILL), run.err
    assert "Traceback" not in run.err, run.err
    line = last_line(run)
    assert sum(l.startswith("error:") for l in re.split(r"[\r\n]+", run.err)) <= 1, run.err
    for word in words:
        assert word in line, line
    return line


def assert_same_tensors(a, b):
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), (a, k)


def metrics(out):
    """metrics.jsonl without its timings."""
    return [{k: v for k, v in json.loads(l).items() if k != "time_s"}
            for l in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out, reference):
    """The same cache, the same final LoRA (bit for bit) and the same metrics as the uninterrupted run."""
    shards = sorted(p.name for p in (reference / "cache").glob("prompt_*.safetensors"))
    assert sorted(p.name for p in (out / "cache").glob("prompt_*.safetensors")) == shards
    for name in shards:
        assert_same_tensors(out / "cache" / name, reference / "cache" / name)
    assert_same_tensors(out / "lora" / gdro.LORA_FILE, reference / "lora" / gdro.LORA_FILE)
    assert metrics(out) == metrics(reference)


def resume_to_the_same_run(gdro_cli, out, reference, from_step=None):
    """`--resume` completes (from the checkpoint of from_step, where given) and ends as the uninterrupted run."""
    resumed = gdro_cli(out, "--resume")
    assert resumed.code == 0, resumed.err
    if from_step is not None:
        assert f"resumed from {out / 'checkpoints' / f'step_{from_step:06d}'}" in resumed.out, resumed.out
    assert_same_run(out, reference)


def shard_times(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "cache").glob("prompt_*.safetensors")}


# ----------------------------------------------------------------------------- bad input: refused before anything

@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def refused(argv):
    """gdro.main(argv) must refuse with a BadInput: exit code 2 and one line. Returns the line."""
    with pytest.raises(gdro.BadInput) as e:
        gdro.main(argv)
    assert e.value.code == 2 and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("flag, value", [
    ("--beta", "nan"), ("--beta", "-1"), ("--tau", "inf"), ("--tau", "-0.1"), ("--gamma", "nan"), ("--gamma", "-1"),
    ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--max-grad-norm", "0"), ("--max-grad-norm", "nan"),
    ("--guidance", "nan"), ("--guidance", "-1"), ("--images-per-prompt", "1"), ("--steps", "0"),
    ("--rollout-batch", "0"), ("--group-size", "1"), ("--group-size", "7"), ("--max-steps", "-1"),
    ("--groups-per-step", "0"), ("--micro-batch", "0"), ("--lora-rank", "0"), ("--log-every", "0"),
    ("--save-every", "0"), ("--seed", "-1"), ("--max-prompts", "0"),
    ("--resolution", "0"), ("--resolution", "8"), ("--resolution", "100")])
def test_a_numeric_flag_out_of_range_is_refused_in_one_line_naming_it_before_anything_is_written(
        prompts, tmp_path, flag, value):
    out = tmp_path / "run"
    line = refused(["--prompts", str(prompts), *BASE, "--out", str(out), flag, value])
    assert line.startswith(f"{flag} ") and "must be" in line
    assert not out.exists()


def test_a_resolution_that_is_not_a_multiple_of_the_model_familys_factor_says_the_factor(prompts, tmp_path):
    gdro.load_more_families()  # all six families
    for family in list(gdro.FAMILIES):
        line = refused(["--prompts", str(prompts), *BASE, "--family", family, "--out", str(tmp_path / "run"),
                        "--resolution", str(4 * gdro.RESOLUTION_FACTOR + 8)])
        assert f"multiple of {gdro.RESOLUTION_FACTOR}" in line


@pytest.mark.parametrize("content, line_at_fault", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1),             # an image given as the prompt file
    ("a red ball\na blue sky\n".encode("utf-16"), 1),       # UTF-16 with its byte order mark
    ("a red ball\na blue sky\n".encode("utf-16-le"), 1),    # UTF-16 without one: NUL bytes
    ("a red ball\na caf\u00e9 in blue\n".encode("latin-1"), 2),
    (b"a red ball\na blue\x00 sky\n", 2)])
def test_a_prompt_file_that_is_not_utf8_text_is_refused_naming_the_file_and_line(tmp_path, content, line_at_fault):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    out = tmp_path / "run"
    line = refused(["--prompts", str(path), *BASE, "--out", str(out)])
    assert str(path) in line and f"line {line_at_fault}" in line
    assert not out.exists()


def test_a_folder_given_as_prompts_is_refused(tmp_path):
    out = tmp_path / "run"
    line = refused(["--prompts", str(tmp_path), *BASE, "--out", str(out)])
    assert "folder" in line and str(tmp_path) in line
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions say")
def test_an_unreadable_prompt_file_is_refused(prompts, tmp_path):
    prompts.chmod(0)
    try:
        line = refused(["--prompts", str(prompts), *BASE, "--out", str(tmp_path / "run")])
    finally:
        prompts.chmod(0o644)
    assert str(prompts) in line and not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_or_under_a_file_is_refused_and_left_alone(prompts, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for out in (file, file / "run"):
        line = refused(["--prompts", str(prompts), *BASE, "--out", str(out)])
        assert f"--out {out}" in line
    assert file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions say")
def test_a_read_only_out_is_refused(prompts, tmp_path):
    out = tmp_path / "run"
    out.mkdir(mode=0o555)
    try:
        line = refused(["--prompts", str(prompts), *BASE, "--out", str(out)])
    finally:
        out.chmod(0o755)
    assert "not a writable folder" in line and not any(out.iterdir())


def test_resume_with_nothing_to_resume_is_refused_saying_what_to_do(prompts, tmp_path):
    out = tmp_path / "run"
    line = refused(["--prompts", str(prompts), *BASE, "--out", str(out), "--resume"])
    assert "no complete checkpoint" in line and "drop --resume" in line
    assert not out.exists()


def test_a_missing_reward_file_is_refused(prompts, tmp_path):
    line = refused(["--prompts", str(prompts), *BASE, "--out", str(tmp_path / "run"),
                    "--reward", f"{tmp_path / 'nope.py'}:f"])
    assert "--reward" in line and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_command_line_exits_2_with_one_line_and_no_traceback_on_bad_input(prompts, tmp_path):
    out = tmp_path / "run"
    cli = subprocess.run([sys.executable, str(HERE / "gdro.py"), "--prompts", str(prompts), *BASE, "--out", str(out),
                          "--lr", "nan"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=RUN_TIMEOUT_S)
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == ["error: --lr nan: must be finite and > 0"]
    assert not out.exists()

# ----------------------------------------------------------------------------- the cache knows what it holds


class ModelLoad(Exception):
    """Raised instead of loading the model: the inputs were accepted."""


@pytest.fixture
def up_to_model_load(monkeypatch):
    """gdro.main(argv) up to the model load: inputs checked, cache manifest and config.json written."""
    def load_pipeline(*args, **kwargs):
        raise ModelLoad

    monkeypatch.setattr(gdro, "load_pipeline", load_pipeline)

    def run(argv):
        with pytest.raises(ModelLoad):
            gdro.main(argv)
    return run


@pytest.mark.parametrize("change, key", [
    (["--resolution", "32"], "resolution"), (["--sampler", "unipc"], "sampler"), (["--seed", "1"], "seed"),
    (["--steps", "2"], "steps"), (["--family", "flux"], "model"), (["--images-per-prompt", "8"], "images_per_prompt"),
    (["--guidance", "2"], "guidance"), ("edit the reward file", "reward_sha256")])
def test_a_rerun_that_would_mix_shards_made_differently_is_refused_and_keeps_config_json(
        up_to_model_load, prompts, tmp_path, change, key):
    reward = tmp_path / "reward.py"
    shutil.copy(HERE / "experiments" / "toy_reward.py", reward)
    out = tmp_path / "run"
    argv = ["--prompts", str(prompts), *BASE, "--out", str(out), "--reward", f"{reward}:colour_reward"]
    up_to_model_load(argv)
    gdro.shard_path(out / "cache", 0).write_bytes(b"a finished shard")
    config = (out / "config.json").read_bytes()
    if change == "edit the reward file":
        reward.write_text(reward.read_text() + "\n# a change\n")
        change = []
    line = refused(argv + change)
    assert f"{key}=" in line and "delete" in line
    assert (out / "config.json").read_bytes() == config


def test_a_failed_first_run_without_shards_does_not_block_a_rerun_made_differently(up_to_model_load, prompts, tmp_path):
    out = tmp_path / "run"
    argv = ["--prompts", str(prompts), *BASE, "--out", str(out)]
    up_to_model_load(argv)  # the first run got no further: no shard
    up_to_model_load(argv + ["--resolution", "32"])
    assert json.loads((out / "cache" / "manifest.json").read_text())["resolution"] == 32

# ----------------------------------------------------------------------------- kills and Ctrl-C in the cache build


@pytest.mark.slow
@pytest.mark.parametrize("point", [
    fault("os.replace", shard_tmp(1), when="after"),     # between shards: shard 1 just renamed into place
    fault("builtins.open", shard_tmp(1), when="after"),  # in a shard write: its temporary file just created, empty
    fault("os.replace", shard_tmp(1))],                  # in a shard write: the temporary file whole, not renamed
    ids=["between_shards", "shard_file_created", "shard_written_not_renamed"])
def test_sigkill_in_the_cache_build_keeps_finished_shards_and_the_rerun_equals_an_uninterrupted_run(
        gdro_cli, reference, tmp_path, point):
    out = tmp_path / "run"
    assert gdro_cli(out, faults=[point]).code == -signal.SIGKILL
    kept = shard_times(out)
    assert "prompt_000000.safetensors" in kept
    for name in kept:  # whole shards only
        assert_same_tensors(out / "cache" / name, reference / "cache" / name)
    rerun = gdro_cli(out)
    assert rerun.code == 0, rerun.err
    assert {k: v for k, v in shard_times(out).items() if k in kept} == kept  # finished shards were not redone
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGUSR1"])
def test_ctrl_c_or_sigterm_in_the_cache_build_finishes_the_prompts_in_flight_says_so_and_the_rerun_continues(
        gdro_cli, reference, tmp_path, stop):
    out = tmp_path / "run"
    # as shard 0 is being written, prompt 1 is being generated: both are finished and kept, prompt 2 is not begun
    stopped = gdro_cli(out, faults=[fault("os.replace", shard_tmp(0), do=stop)])
    assert stopped.code == 1
    assert last_line(stopped) == "interrupted; 2 of 3 prompts are cached; rerun the same command to continue"
    kept = shard_times(out)
    assert sorted(kept) == ["prompt_000000.safetensors", "prompt_000001.safetensors"]
    rerun = gdro_cli(out)
    assert rerun.code == 0, rerun.err
    assert {k: v for k, v in shard_times(out).items() if k in kept} == kept
    assert_same_run(out, reference)


@pytest.mark.slow
def test_a_second_ctrl_c_in_the_cache_build_stops_at_once_and_keeps_the_finished_shards(gdro_cli, reference,
                                                                                         tmp_path):
    out = tmp_path / "run"
    stopped = gdro_cli(out, faults=[fault("os.replace", shard_tmp(1), do="SIGINT+SIGINT")])
    line = assert_one_line_error(stopped, "rerun the same command")
    cached = int(re.search(r"interrupted; (\d+) of 3 prompts are cached", line).group(1))
    assert cached == len(shard_times(out)) >= 1
    rerun = gdro_cli(out)
    assert rerun.code == 0, rerun.err
    assert_same_run(out, reference)

# ----------------------------------------------------------------------------- kills and Ctrl-C in training


@pytest.mark.slow
def test_sigkill_in_training_then_resume_ends_with_the_uninterrupted_lora_even_after_a_torn_metrics_line(
        gdro_cli, reference, tmp_path):
    out = with_cache(reference, tmp_path)
    assert gdro_cli(out, faults=[fault(BACKWARD, calls=IN_STEP_3)]).code == -signal.SIGKILL  # in step 3
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # what a kill in the middle of appending a line leaves
    assert (out / ".lock").read_text().strip().isdigit()  # the killed run's lock file is left; its lock is not
    resume_to_the_same_run(gdro_cli, out, reference, from_step=2)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGUSR1"])  # Ctrl-C, a preemption, SLURM's early warning
def test_ctrl_c_or_sigterm_in_training_finishes_the_step_saves_and_resume_ends_with_the_uninterrupted_lora(
        gdro_cli, reference, tmp_path, stop):
    out = with_cache(reference, tmp_path)
    stopped = gdro_cli(out, faults=[fault(BACKWARD, calls=IN_STEP_3, do=stop)])
    assert stopped.code == 1
    saved = out / "checkpoints" / "step_000003"
    assert last_line(stopped) == f"interrupted after step 3; saved {saved}; continue with the same command and --resume"
    assert "Traceback" not in stopped.err and gdro.checkpoints(out / "checkpoints")[-1] == saved
    resume_to_the_same_run(gdro_cli, out, reference, from_step=3)


@pytest.mark.slow
def test_a_second_ctrl_c_discards_the_step_in_flight_and_resume_still_ends_with_the_uninterrupted_lora(
        gdro_cli, reference, tmp_path):
    out = with_cache(reference, tmp_path)
    stopped = gdro_cli(out, faults=[fault(BACKWARD, calls=IN_STEP_3, do="SIGINT+SIGINT")])
    previous = out / "checkpoints" / "step_000002"
    line = assert_one_line_error(stopped, "interrupted during step 3, which was discarded", str(previous))
    assert gdro.checkpoints(out / "checkpoints")[-1] == previous, line
    resume_to_the_same_run(gdro_cli, out, reference, from_step=2)

# ----------------------------------------------------------------------------- kills in a checkpoint save


LORA_TMP, STATE_TMP = f".{gdro.LORA_FILE}.tmp", ".state.pt.tmp"


SHA_TMP = f".{gdro.SHA256_FILE}.tmp"


@pytest.mark.slow
@pytest.mark.parametrize("point, resumes_from", [
    (fault("builtins.open", f"{checkpoint_tmp(4)}/{LORA_TMP}", when="after"), 2),  # the LoRA file just created
    (fault("os.replace", f"{checkpoint_tmp(4)}/{LORA_TMP}", when="after"), 2),     # the LoRA file written
    (fault("builtins.open", f"{checkpoint_tmp(4)}/{STATE_TMP}", when="after"), 2),  # state.pt just created
    (fault("os.replace", f"{checkpoint_tmp(4)}/{STATE_TMP}", when="after"), 2),     # state.pt written
    (fault("builtins.open", f"{checkpoint_tmp(4)}/{SHA_TMP}", calls=[2], when="after"), 2),  # the hashes, last
    (fault("os.replace", checkpoint_tmp(4), when="after"), 4),                     # folder renamed, older state kept
    (fault("pathlib.Path.unlink", "step_000001/state.pt", when="after"), 3)],      # (every step) the oldest state gone
    ids=["lora_created", "lora_written", "state_created", "state_written", "hashes_created", "renamed",
         "older_state_deleted"])
def test_sigkill_at_any_point_of_a_checkpoint_save_leaves_a_checkpoint_that_resumes_to_the_uninterrupted_lora(
        gdro_cli, reference, tmp_path, point, resumes_from):
    out = with_cache(reference, tmp_path)
    flags = ["--save-every", "1"] if "step_000001" in point["suffix"] else []
    assert gdro_cli(out, *flags, faults=[point]).code == -signal.SIGKILL
    resume_to_the_same_run(gdro_cli, out, reference, from_step=resumes_from)


@pytest.mark.slow
def test_a_kill_in_the_first_checkpoint_save_leaves_nothing_to_resume_which_resume_says_and_a_rerun_completes(
        gdro_cli, reference, tmp_path):
    out = with_cache(reference, tmp_path)
    assert gdro_cli(out, faults=[fault("os.replace", checkpoint_tmp(2))]).code == -signal.SIGKILL
    config = (out / "config.json").read_bytes()
    resume = gdro_cli(out, "--resume")
    assert resume.code == 2
    assert_one_line_error(resume, "no complete checkpoint", "drop --resume")
    assert (out / "config.json").read_bytes() == config
    rerun = gdro_cli(out)
    assert rerun.code == 0, rerun.err
    assert_same_run(out, reference)

# ----------------------------------------------------------------------------- a full disk, a refused write


@pytest.mark.slow
@pytest.mark.parametrize("error, says", [("ENOSPC", "the disk is full"), ("EACCES", "permission denied")])
def test_a_failed_shard_write_stops_with_one_line_keeps_finished_shards_and_the_rerun_completes(
        gdro_cli, reference, tmp_path, error, says):
    out = tmp_path / "run"
    stopped = gdro_cli(out, faults=[fault("builtins.open", shard_tmp(1), do=error)])
    assert_one_line_error(stopped, str(gdro.shard_path(out / "cache", 1)), says, "rerun the same command")
    assert list(shard_times(out)) == ["prompt_000000.safetensors"]
    assert_same_tensors(gdro.shard_path(out / "cache", 0), gdro.shard_path(reference / "cache", 0))
    rerun = gdro_cli(out)
    assert rerun.code == 0, rerun.err
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("point, file", [
    (fault("builtins.open", f"{checkpoint_tmp(4)}/{STATE_TMP}", do="ENOSPC"), "state.pt"),
    (fault("builtins.open", "metrics.jsonl", calls=[3], do="ENOSPC"), "metrics.jsonl")],  # step 3's line
    ids=["checkpoint", "metrics"])
def test_a_full_disk_in_training_stops_with_one_line_keeps_the_last_checkpoint_and_resume_completes(
        gdro_cli, reference, tmp_path, point, file):
    out = with_cache(reference, tmp_path)
    stopped = gdro_cli(out, faults=[point])
    assert_one_line_error(stopped, file, "the disk is full")
    assert gdro.checkpoints(out / "checkpoints")[-1] == out / "checkpoints" / "step_000002"
    resume_to_the_same_run(gdro_cli, out, reference, from_step=2)

# ----------------------------------------------------------------------------- a broken reward, a broken shard


FAILING_REWARD = '''
from experiments.toy_reward import colour_reward


def reward(images, prompts):
    if "green" in prompts[0]:  # the second prompt
        raise ZeroDivisionError("a bug in the reward")
    return colour_reward(images, prompts)
'''
STRING_REWARD = '''
def reward(images, prompts):
    return ["good"] * len(images)
'''
FIXED_REWARD = '''
from experiments.toy_reward import colour_reward


def reward(images, prompts):
    return colour_reward(images, prompts)
'''


@pytest.mark.slow
def test_a_reward_that_raises_stops_with_one_line_its_traceback_below_and_keeps_finished_shards(gdro_cli, tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text(FAILING_REWARD)
    out = tmp_path / "run"
    stopped = gdro_cli(out, "--reward", f"{reward}:reward")
    assert stopped.code == 1
    lines = stopped.err.splitlines()
    first = next(i for i, l in enumerate(lines) if l.startswith("error:"))
    assert "prompt 2" in lines[first] and "ZeroDivisionError: a bug in the reward" in lines[first]
    assert "rerun the same command" in lines[first]
    assert 'raise ZeroDivisionError("a bug in the reward")' in "\n".join(lines[first + 1:])  # the user's traceback
    assert list(shard_times(out)) == ["prompt_000000.safetensors"]
    config = (out / "config.json").read_bytes()
    reward.write_text(FIXED_REWARD)  # scored by another reward file now: shard 0 must not be mixed in
    refused_rerun = gdro_cli(out, "--reward", f"{reward}:reward")
    assert refused_rerun.code == 2
    assert_one_line_error(refused_rerun, "reward_sha256", "delete")
    assert (out / "config.json").read_bytes() == config


@pytest.mark.slow
def test_a_reward_returning_strings_stops_with_one_line_and_its_corrected_rerun_equals_a_normal_run(
        gdro_cli, reference, tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text(STRING_REWARD)
    out = tmp_path / "run"
    stopped = gdro_cli(out, "--reward", f"{reward}:reward")
    assert stopped.code == 1
    lines = stopped.err.splitlines()
    assert any(x.startswith("error: the reward") and "prompt 1" in x and "'good'" in x for x in lines)
    reward.write_text(FIXED_REWARD)
    rerun = gdro_cli(out, "--reward", f"{reward}:reward")
    assert rerun.code == 0, rerun.err
    assert_same_run(out, reference)


@pytest.mark.slow
def test_a_truncated_shard_is_named_with_how_to_regenerate_it_and_doing_so_completes_the_run(gdro_cli, reference,
                                                                                            tmp_path):
    out = with_cache(reference, tmp_path)
    shard = gdro.shard_path(out / "cache", 1)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    stopped = gdro_cli(out)
    assert_one_line_error(stopped, str(shard), "delete it", "regenerate")
    shard.unlink()
    rerun = gdro_cli(out)
    assert rerun.code == 0, rerun.err
    assert_same_run(out, reference)

# ----------------------------------------------------------------------------- clusters: preemption, shared folders


def stopped_at_step_3(gdro_cli, reference, tmp_path):
    """A run stopped by SIGTERM in step 3: checkpoints step_000002 and step_000003 (both resumable)."""
    out = with_cache(reference, tmp_path)
    assert gdro_cli(out, faults=[fault(BACKWARD, calls=IN_STEP_3, do="SIGTERM")]).code == 1
    return out


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_naming_the_holder_while_the_first_completes_unharmed(
        gdro_cli, reference, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    first = subprocess.Popen([sys.executable, str(HERE / "gdro.py"), "--prompts", str(prompts), *BASE, "--out",
                              str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".lock"
    while first.poll() is None and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.05)
    second = gdro_cli(out)
    assert second.code == 2
    assert_one_line_error(second, f"--out {out} is in use by another run (PID {first.pid})")
    _, err = first.communicate(timeout=RUN_TIMEOUT_S)
    assert first.returncode == 0, err
    assert_same_run(out, reference)


@pytest.mark.slow
def test_resume_with_a_changed_setting_says_what_changed_and_config_json_keeps_the_first_runs_and_the_resume(
        gdro_cli, reference, tmp_path):
    out = stopped_at_step_3(gdro_cli, reference, tmp_path)
    resumed = gdro_cli(out, "--resume", "--beta", "3")
    assert resumed.code == 0, resumed.err
    assert ("--resume with changed settings: --beta 12.0 -> 3.0; the run is no longer what an uninterrupted one "
            "would be") in resumed.out
    config = json.loads((out / "config.json").read_text())
    assert config["beta"] == 12.0 and config["resumes"] == [{"step": 3, "changes": {"beta": [12.0, 3.0]}}]
    again = gdro_cli(out, "--resume", "--max-steps", "5")  # longer: not a change of what is learned
    assert again.code == 0 and "changed settings" not in again.out, again.out
    assert json.loads((out / "config.json").read_text())["resumes"][1] == {"step": 4, "changes": {}}


@pytest.mark.slow
def test_resume_with_another_lora_rank_is_refused_in_one_line_and_changes_nothing(gdro_cli, reference, tmp_path):
    out = stopped_at_step_3(gdro_cli, reference, tmp_path)
    config = (out / "config.json").read_bytes()
    refused_run = gdro_cli(out, "--resume", "--lora-rank", "4")
    assert refused_run.code == 2
    assert_one_line_error(refused_run, "--lora-rank 8 -> 4", "cannot continue")
    assert (out / "config.json").read_bytes() == config
    resume_to_the_same_run(gdro_cli, out, reference, from_step=3)


def damage(path):
    """64 bytes zeroed in the middle of a file: still the same size, still loadable, wrong."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["state.pt", gdro.LORA_FILE])
def test_a_damaged_checkpoint_file_is_refused_in_one_line_saying_to_resume_from_the_one_before(
        gdro_cli, reference, tmp_path, name):
    out = stopped_at_step_3(gdro_cli, reference, tmp_path)
    newest = out / "checkpoints" / "step_000003"
    damage(newest / name)
    refused_run = gdro_cli(out, "--resume")
    assert refused_run.code == 2
    assert_one_line_error(refused_run, f"checkpoint file {newest / name} is damaged", f"delete {newest}",
                          "--resume to continue from step_000002")
    shutil.rmtree(newest)
    resume_to_the_same_run(gdro_cli, out, reference, from_step=2)


@pytest.mark.slow
def test_a_damaged_cache_shard_stops_training_in_one_line_naming_it_and_regenerating_it_completes_the_run(
        gdro_cli, reference, tmp_path):
    out = with_cache(reference, tmp_path)
    shard = gdro.shard_path(out / "cache", 1)
    damage(shard)
    stopped = gdro_cli(out)
    assert stopped.code == 1
    assert_one_line_error(stopped, f"cache shard {shard} is damaged", "delete it")
    shard.unlink()
    rerun = gdro_cli(out)  # stopped in step 1, before a checkpoint: the same command, no --resume
    assert rerun.code == 0, rerun.err
    assert_same_run(out, reference)

# ----------------------------------------------------------------------------- trackers, rewards, the hub

def test_wandb_online_without_credentials_is_refused_with_the_flags_before_the_cache(prompts, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no `wandb login` either
    out = tmp_path / "run"
    line = refused(["--prompts", str(prompts), *BASE, "--out", str(out), "--report-to", "wandb"])
    assert line.startswith("--report-to wandb: ") and "WANDB_MODE=offline" in line and "wandb login" in line
    assert not out.exists()


def test_wandb_online_with_an_unreachable_server_is_refused_in_seconds_not_after_a_hang(prompts, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://no-such-host.invalid")
    started = time.time()
    line = refused(["--prompts", str(prompts), *BASE, "--out", str(tmp_path / "run"), "--report-to", "wandb"])
    assert "cannot reach no-such-host.invalid" in line and "WANDB_MODE=offline" in line
    assert time.time() - started < 30


def test_a_reward_that_calls_sys_exit_stops_the_run_saying_so(prompts, tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text("import sys\n\ndef reward(images, prompts):\n    sys.exit(3)\n")
    with pytest.raises(SystemExit) as e:
        gdro.main(["--prompts", str(prompts), *BASE, "--out", str(tmp_path / "run"), "--reward", f"{reward}:reward"])
    first = str(e.value.code).splitlines()[0]
    assert first.startswith("error: the reward") and "SystemExit: 3" in first and "prompt 1" in first


def test_a_gated_hub_model_is_refused_naming_its_page_and_the_login(prompts, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):  # the hub's error, made without an HTTP response
        error = GatedRepoError.__new__(GatedRepoError)
        OSError.__init__(error, "401 Client Error. Access to model stabilityai/stable-diffusion-3.5-medium is "
                                "restricted")
        raise error
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", gated)
    line = refused(["--prompts", str(prompts), "--reward", REWARD, "--out", str(tmp_path / "run")])
    assert "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium" in line and "hf auth login" in line
