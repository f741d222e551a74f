"""The comparison's bookkeeping (experiments/compare.py): which checkpoints are scored, their compute, and the table
at equal compute. The comparison itself is `python -m experiments.compare` (docs/experiments.md)."""
import json
import re
import sys

import pytest

from experiments import compare


def write_run(folder, clock, metrics=()):
    """A run's folder as compare leaves it: clock.json ({step: CPU seconds}) and metrics.jsonl."""
    folder.mkdir(parents=True)
    compare.write_clock(folder, {"cpu_seconds": max(clock.values(), default=0.0), "steps": clock})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_flow_grpos_scored_checkpoints_are_the_latest_within_each_multiple_of_gdros_cost(tmp_path):
    clock = {s: 30.0 * s for s in range(1, 21)}  # CPU seconds of its process when each step's checkpoint appeared
    write_run(tmp_path / "flow", clock, [{"step": s, "images_sampled": 48 * s} for s in clock])
    points = compare.flow_points(tmp_path / "flow", gdro_cost=280.0)  # 0.25, 0.5, 1, 1.5, 2 x 280 s
    assert [p["step"] for p in points] == [0, 2, 4, 9, 14, 18]  # step 0: the base, at no compute
    assert all(p["cpu_seconds"] <= f * 280.0 for p, f in zip(points[1:], compare.FLOW_POINTS))
    assert points[0]["lora"] is None and points[0]["images"] == 0
    assert points[1]["images"] == 96 and points[1]["lora"].endswith("checkpoints/step_000002")


def test_an_offline_methods_compute_is_its_caches_process_then_its_training_process_to_each_checkpoint(tmp_path):
    write_run(tmp_path / "gdro", {50: 140.5, 100: 236.0})  # the training process, from its start (model loading)
    points = compare.offline_points(tmp_path / "gdro", cache_cpu=400.0, images=1280)
    assert [(p["step"], p["cpu_seconds"], p["images"]) for p in points] == [(0, 400.0, 1280), (50, 540.5, 1280),
                                                                              (100, 636.0, 1280)]
    assert points[0]["lora"] is None and points[2]["lora"].endswith("step_000100")


# a child that spends CPU, makes checkpoint folders, and prints its own CPU seconds (since its start) at each
CHILD = """
import pathlib, sys, time
def spend(seconds):
    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
for step in (1, 2):
    spend(0.4)
    print(step, time.process_time(), flush=True)
    pathlib.Path(sys.argv[1], f"step_{step:06d}").mkdir(parents=True)
spend(0.3)
print("end", time.process_time(), flush=True)
sys.exit(int(sys.argv[2]))
"""


def test_a_runs_cpu_seconds_are_its_whole_processes_and_each_checkpoints_as_it_appears(tmp_path):
    ckpts, log = tmp_path / "checkpoints", tmp_path / "run.log"
    clock = compare.clocked([sys.executable, "-c", CHILD, ckpts, 0], log, ckpts)
    printed = dict(re.findall(r"^(1|2|end) ([0-9.]+)$", log.read_text(), re.M))  # after the logged command
    printed = {k: float(v) for k, v in printed.items()}
    assert list(clock["steps"]) == [1, 2]
    for step, cpu in clock["steps"].items():  # read at the first look after the folder appeared
        assert printed[str(step)] <= cpu + 0.02 <= printed[str(step)] + compare.POLL_S + 0.5, (clock, printed)
    assert printed["end"] <= clock["cpu_seconds"] + 0.02 and clock["steps"][2] <= clock["cpu_seconds"]
    with pytest.raises(SystemExit, match="run.log"):  # a failure names its log
        compare.clocked([sys.executable, "-c", CHILD, tmp_path / "again", 3], log)


def test_a_method_is_read_at_the_latest_checkpoint_its_compute_allows_and_not_before_its_first():
    points = [{"cpu_seconds": s} for s in (100.0, 200.0, 300.0)]
    assert compare.at_compute(points, 250.0) is points[1]
    assert compare.at_compute(points, 300.0) is points[2]
    assert compare.at_compute(points, 50.0) is None


def test_the_table_holds_every_method_at_gdros_whole_cost_and_at_twice_it_for_each_seed():
    point = lambda s, g: {"cpu_seconds": s, "images": 3200, "gain": g, "gain_se": 0.01}
    runs = {m: [point(100.0, 0.05), point(200.0, 0.1)] for m in compare.METHODS}
    runs["flow_grpo"] = [point(100.0, 0.01), point(200.0, 0.02), point(400.0, 0.04)]
    table = compare.table({"seeds": [0, 1], "runs": {"0": runs, "1": runs}})
    lines = table.splitlines()
    assert len(lines) == 2 + len(compare.METHODS)
    flow = next(line for line in lines if line.startswith("| Flow-GRPO"))
    assert "+0.020 +- 0.010 / +0.020 +- 0.010" in flow and "+0.040 +- 0.010" in flow  # at 200 s, then at 400 s
    gdro = next(line for line in lines if line.startswith("| GDRO (Euler"))
    assert gdro.count("+0.100 +- 0.010") == 4  # its end, at its whole cost and at twice it (it stops there), 2 seeds
    points = {m: [point(100.0, 0.05)] for m in compare.METHODS}
    points["flow_grpo"] = [point(150.0, 0.01)]  # Flow-GRPO's first checkpoint already past GDRO's cost
    flow = next(line for line in compare.table({"seeds": [0], "runs": {"0": points}}).splitlines()
                if line.startswith("| Flow-GRPO"))
    assert flow.startswith("| Flow-GRPO (online) | - | - | +0.010")


def test_the_figure_has_a_line_per_method_and_is_a_small_png(tmp_path):
    point = lambda s, g: {"cpu_seconds": s, "images": 1280, "gain": g, "gain_se": 0.015}
    runs = {m: [point(400.0, 0.0)] + [point(400.0 + 95 * k, -0.01 * k) for k in range(1, 5)] for m in compare.METHODS}
    runs["flow_grpo"] = [point(0.0, 0.0)] + [point(196.0 * f, 0.005 - 0.01 * f) for f in compare.FLOW_POINTS]
    compare.plot_results({"seeds": [0, 1], "runs": {"0": runs, "1": runs}}, tmp_path / "compare.png")
    from PIL import Image
    with Image.open(tmp_path / "compare.png") as image:
        assert image.size == (760, 460)
    assert (tmp_path / "compare.png").stat().st_size < 300_000
