"""GDRO learns: on the toy colour reward the trained LoRA raises the reward of fresh images for held-out prompts.

Runs the main experiment of experiments/run.py (tiny random SD3, CPU, about 100 s on 2 cores: 200 training steps
of 6 groups, half the experiment's 12, at 3.0 steps/s; effect size +1.97 measured): cache -> gdro_loss -> LoRA ->
fresh samples from 12 seeds never cached, for prompts never trained on. It fails when training does nothing
(`--set max-steps=0`, or `--set beta=0 gamma=0`: effect size exactly 0, no prompt improved).
"""
import json
import random

import numpy as np
import pytest
import torch

from experiments import run as experiment
from experiments import text_model


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
