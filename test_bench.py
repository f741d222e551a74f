"""Smoke tests of bench.py: the quick run prints the figures as one JSON line. Timing targets are not asserted
(timings on a shared CI machine are noise); only that every figure is a positive finite number."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

import bench

FIGURES = ("step_overhead", "rollout_overhead", "ckpt_memory_ratio", "offline_amortization")


def test_quick_run_prints_figures_as_last_json_line():
    run = subprocess.run([sys.executable, "bench.py", "--quick"], cwd=Path(__file__).parent,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in FIGURES:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    for name in ("sd3.5-medium", "flux.1-dev"):  # computed on the meta device, never allocated
        assert result["real"][name]["params"] > 1e9 and result["real"][name]["bf16_weight_gib"] > 1


def test_peak_memory_counts_live_bytes_on_cpu():
    def run():
        a = torch.empty(4 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)  # 6 MiB live together
        del a, b
        c = torch.empty(1 << 20, dtype=torch.uint8)  # freed by then: the peak stays 6 MiB
        del c
    assert bench.peak_memory(run, "cpu") == 6 << 20


def test_amortization_is_the_epoch_count_when_training_is_free():
    # no backward FLOPs and no training rows: GDRO's cost is the cache over the epochs, online regenerates each time
    flops = {"fwd": 1, "bwd": 0}
    assert math.isclose(bench.measure_amortization(20, 0, 6, flops, cached_images=16, steps=8), 8 * 6 / 16)
