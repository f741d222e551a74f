"""GDRO learns: on the toy colour reward the trained LoRA raises the reward of fresh images for held-out prompts.

Runs the main experiment of experiments/run.py (tiny random SD3, CPU, about 100 s on 2 cores: 200 training steps
of 6 groups, half the experiment's 12, at 3.0 steps/s; effect size +1.97 measured): cache -> gdro_loss -> LoRA ->
fresh samples from 12 seeds never cached, for prompts never trained on. It fails when training does nothing
(`--set max-steps=0`, or `--set beta=0 gamma=0`: effect size exactly 0, no prompt improved).
"""
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import gdro
from experiments import run as experiment
from experiments import text_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


@pytest.mark.slow
def test_gdro_raises_reward_on_held_out_prompts_and_seeds(tmp_path):
    threads = str(torch.get_num_threads())  # 2 alone on 2 cores; 1 in a pytest -n 2 worker
    results = experiment.main(["--out", str(tmp_path / "experiment"), "--threads", threads, "--eval-seeds", "12",
                               "--set", "groups-per-step=6", "micro-batch=6"])
    held_out = results["held_out_prompts"]
    assert held_out["effect_size"] >= 1.0, held_out
    assert held_out["improved"] >= 0.75, held_out


def write_scores(folder, rewards, small):
    """eval.py's scores.jsonl in folder: rewards[set][prompt] lists the OCR reward of each image, and the image is a
    render of the text model's, small (the unreadable mode) where small[set][prompt] says so."""
    rows, rng = [], random.Random(0)
    for name, per in rewards.items():
        (folder / name).mkdir(parents=True)
        for i, rs in per.items():
            for j, r in enumerate(rs):
                text_model.render("123", rng, small=small[name][i][j]).save(folder / name / f"{i}_{j}.png")
                rows.append({"set": name, "prompt_index": i, "ocr_reward": r, "image": f"{name}/{i}_{j}.png"})
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "scores.jsonl"


def test_the_ocr_gain_is_the_mean_per_prompt_paired_difference_with_its_standard_error(tmp_path):
    # 3 prompts x 2 images (same seeds) for the base and the LoRA
    base = {0: [0.0, 1 / 3], 1: [2 / 3, 2 / 3], 2: [1.0, 0.0]}
    lora = {0: [1 / 3, 1 / 3], 1: [1.0, 2 / 3], 2: [1.0, 1.0]}
    small = {"base": {0: [True, True], 1: [False, False], 2: [False, True]}, "lora": {i: [False, False] for i in base}}
    g = experiment.paired_gain(write_scores(tmp_path, {"base": base, "lora": lora}, small))
    d = [np.mean(lora[i]) - np.mean(base[i]) for i in range(3)]  # 1/6, 1/6, 1/2
    assert g["gain"] == pytest.approx(np.mean(d)) and g["gdro_ocr"] - g["base_ocr"] == pytest.approx(np.mean(d))
    assert g["gain_se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(3))
    assert g["base_exact"] == pytest.approx(1 / 6) and g["gdro_exact"] == pytest.approx(3 / 6)
    assert g["prompts_improved"] == pytest.approx(1.0) and g["prompts_worse"] == 0.0
    # large text: the base's full-width renders are 3 of 6 (rewards 2/3, 2/3, 1), the LoRA's all 6
    assert g["base_large_text"] == pytest.approx(0.5) and g["gdro_large_text"] == 1.0
    assert g["base_large_text_ocr"] == pytest.approx(7 / 9) and g["gdro_large_text_ocr"] == pytest.approx(13 / 18)


def test_the_ocr_step_is_the_checkpoint_best_on_val_and_the_earliest_of_equals(tmp_path):
    # eval.py --checkpoints on the val strings: 2 prompts x 1 image for the base and three checkpoints
    val = {"base": [0.0, 0.0], "step_000050": [1.0, 0.0], "step_000100": [0.5, 1.0], "step_000150": [1.0, 0.5]}
    rewards = {name: {i: [r] for i, r in enumerate(rs)} for name, rs in val.items()}
    write_scores(tmp_path / "eval_val", rewards, {name: {i: [False] for i in per} for name, per in rewards.items()})
    chosen = experiment.best_on_val(tmp_path)
    assert chosen["step"] == 100 and chosen["lora"] == str(tmp_path / "checkpoints" / "step_000100")
    assert chosen["val_ocr"] == {50: 0.5, 100: 0.75, 150: 0.75} and chosen["val_base_ocr"] == 0.0


def script(module, *argv):
    """python -m experiments.MODULE ARGV from the repository root, one thread: (exit code, stdout, stderr, seconds)."""
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", f"experiments.{module}", *map(str, argv)], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    return done.returncode, done.stdout, done.stderr, time.time() - t0


def one_line_refusal(code, out, err, words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (code, err)
    assert "Traceback" not in out + err, out + err


@pytest.mark.slow
def test_each_experiments_script_answers_help_and_refuses_a_bad_flag_in_one_line_from_the_command_line(tmp_path):
    """Through python -m and its __main__ (gdro.cli), a second or two each: the import of torch is most of it."""
    bad = {"run": (["--eval-seeds", 0], "--eval-seeds 0"),
           "text_model": (["--out", tmp_path / "t", "--set", "steps=0"], "--set steps=0"),
           "bench": (["--threads", 0], "--threads 0"),
           "flow_grpo": (["--model", "x/y", "--prompts", tmp_path / "missing.txt"], "missing.txt: file not found"),
           "compare": (["--out", tmp_path / "c", "--scale", "gdro_steps=many"], "--scale gdro_steps=many")}
    assert set(bad) <= set(SCRIPTS), SCRIPTS
    runs = [(m, ["--help"]) for m in SCRIPTS] + [(m, argv) for m, (argv, _) in bad.items()]
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(lambda run: script(run[0], *run[1]), runs))
    for (module, argv), (code, out, err, seconds) in zip(runs, found):
        if argv == ["--help"]:
            assert code == 0 and out.startswith("usage:") and not err.strip(), (module, out, err)
        else:
            one_line_refusal(code, out, err, bad[module][1])
        assert seconds < 60, (module, argv, seconds)
    assert not (tmp_path / "t").exists() and not (tmp_path / "c").exists()


def bad_inputs():
    """(script, argv, what the one line must say) with TMP for a fresh folder: each kind of input a script refuses."""
    flow = ["--model", "someone/a-model", "--prompts", "ocr.txt", "--out", "TMP/flow"]
    return [
        ("flow_grpo", ["--model", "x/y", "--prompts", "TMP/missing.txt"], "--prompts TMP/missing.txt: file not found"),
        ("flow_grpo", [*flow, "--reward", "TMP/missing.py:f"], "--reward TMP/missing.py:f"),
        ("flow_grpo", [*flow, "--save-every", "0"], "--save-every 0: must be at least 1"),
        ("flow_grpo", [*flow, "--max-steps", "0"], "--max-steps 0: must be at least 1"),
        ("flow_grpo", [*flow, "--max-steps", "-5"], "--max-steps -5: must be at least 1"),
        ("flow_grpo", [*flow, "--max-cpu-seconds", "nan"], "--max-cpu-seconds nan: must be > 0"),
        ("flow_grpo", [*flow, "--set", "lr=fast"], "--set lr=fast: lr takes float values"),
        ("flow_grpo", [*flow, "--set", "kl=-1"], "--set kl=-1.0: must be finite and >= 0"),
        ("flow_grpo", [*flow, "--set", "group_size=1"], "--set group_size=1: must be at least 2"),
        ("flow_grpo", [*flow, "--set", "train_steps=11"], "--set train_steps=11: must be at most 10"),
        ("flow_grpo", [*flow, "--set", "speed=2"], "--set speed=2: expected KEY=VALUE"),
        ("flow_grpo", [*flow, "--model", "docs"], "--model docs: a folder without model_index.json"),
        ("flow_grpo", [*flow, "--out", "TMP/flow_run"], "holds a run already"),
        ("compare", ["--out", "TMP/c", "--model-dir", "TMP/none"], "python -m experiments.text_model --recipe mode"),
        ("compare", ["--out", "TMP/c", "--scale", "gdro_steps=many"], "--scale gdro_steps=many: gdro_steps takes int"),
        ("compare", ["--out", "TMP/c", "--scale", "save_every=-1"], "--scale save_every=-1: must be at least 1"),
        ("compare", ["--out", "TMP/c", "--scale", "heldout_strings=500"], "heldout_strings=500: must be at most 100"),
        ("compare", ["--out", "TMP/c", "--seeds", "0", "0"], "--seeds [0, 0]: must be distinct"),
        ("compare", ["--out", "TMP/c", "--plot", "TMP/c.txt"], "must be a .png, .svg or .pdf file"),
        ("compare", ["--out", "TMP/c", "--plot-only"], "no seed_*.json in TMP/c"),
        ("compare", ["--out", "TMP/note.txt"], "--out TMP/note.txt is a file, not a folder"),
        ("run", ["--out", "TMP/r", "--set", "lr=0"], "--set: --lr 0.0: must be finite and > 0"),
        ("run", ["--out", "TMP/r", "--set", "max-steps=ten"], "--set max-steps=ten: max-steps takes int"),
        ("run", ["--out", "TMP/r", "--ocr", "--model-dir", "TMP/none"], "python -m experiments.text_model --out"),
        ("run", ["--out", "TMP/r", "--ocr", "--ocr-set", "group-size=1"], "--ocr-set: --group-size 1: must be"),
        ("run", ["--out", "TMP/r", "--ocr", "--ocr-set", "speed=2"], "--ocr-set: gdro.py unrecognized arguments"),
        ("run", ["--out", "TMP/r", "--ocr", "--ablations"], "run python -m experiments.run --ocr --out TMP/r first"),
        ("run", ["--out", "TMP/r", "--eval-seeds", "0"], "--eval-seeds 0: must be at least 2"),
        ("text_model", ["--out", "TMP/t", "--set", "steps=0"], "--set steps=0: must be at least 1"),
        ("text_model", ["--out", "TMP/t", "--set", "ema=1"], "--set ema=1.0: must be at least 0 and below 1"),
        ("text_model", ["--out", "TMP/t", "--set", "lr=x"], "--set lr=x: lr takes float"),
        ("text_model", ["--out", "TMP/other_model"], "holds a text model of another recipe"),
        ("bench", ["--threads", "0"], "--threads 0: must be at least 1"),
        ("bench", ["--samplers", "--quick"], "--samplers measures only that; drop --quick"),
        ("bench", ["--speed"], "unrecognized arguments: --speed"),
    ]


@pytest.mark.parametrize("module, argv, words", bad_inputs())
def test_every_bad_input_of_the_experiments_scripts_is_refused_in_one_line_with_exit_2_before_any_work(
        module, argv, words, tmp_path, capsys):
    """The scripts' main as their __main__ runs it (gdro.cli), in this process: milliseconds a case."""
    import importlib
    (tmp_path / "flow_run").mkdir()
    (tmp_path / "flow_run" / "metrics.jsonl").write_text("{}\n")  # a Flow-GRPO run's log
    (tmp_path / "other_model").mkdir()
    (tmp_path / "other_model" / "text_model.json").write_text(json.dumps({"record": {"recipe": {"steps": 1}}}))
    (tmp_path / "note.txt").write_text("a file\n")
    main = importlib.import_module(f"experiments.{module}").main
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as stopped:
        gdro.cli(lambda: main(argv))
    out, err = capsys.readouterr()
    one_line_refusal(stopped.value.code, out, err, words.replace("TMP", str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow_run", "note.txt", "other_model"]  # nothing written
