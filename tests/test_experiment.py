"""GDRO learns: on the toy colour reward the trained LoRA raises the reward of fresh images for held-out prompts.

Runs the main experiment of experiment.py (tiny random SD3, CPU, about 1.5 minutes on 2 cores): cache -> gdro_loss ->
LoRA -> fresh samples from seeds never cached, for prompts never trained on. It fails when training does nothing
(`--set max-steps=0`, or `--set beta=0 gamma=0`: effect size exactly 0, no prompt improved).
"""
import pytest

import experiment


@pytest.mark.slow
def test_gdro_raises_reward_on_held_out_prompts_and_seeds(tmp_path):
    results = experiment.main(["--out", str(tmp_path / "experiment")])
    held_out = results["held_out_prompts"]
    assert held_out["effect_size"] >= 1.0, held_out
    assert held_out["improved"] >= 0.75, held_out
