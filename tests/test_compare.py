"""The comparison's bookkeeping (experiments/compare.py): which checkpoints are scored, their compute, and the table
at equal compute. The comparison itself is `python -m experiments.compare` (docs/experiments.md)."""
import json

from experiments import compare


def write_log(folder, lines):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_flow_grpos_scored_checkpoints_are_the_latest_within_each_multiple_of_gdros_cost(tmp_path):
    log = [{"step": s, "seconds": 30.0 * s, "images_sampled": 48 * s} for s in range(1, 21)]  # to 600 s
    write_log(tmp_path / "flow", log)
    points = compare.flow_points(tmp_path / "flow", gdro_cost=280.0)  # 0.25, 0.5, 1, 1.5, 2 x 280 s
    assert [p["step"] for p in points] == [0, 2, 4, 9, 14, 18]  # step 0: the base, at no compute
    assert all(p["seconds"] <= f * 280.0 for p, f in zip(points[1:], compare.FLOW_POINTS))
    assert points[0]["lora"] is None and points[0]["images"] == 0
    assert points[1]["images"] == 96 and points[1]["lora"].endswith("checkpoints/step_000002")


def test_a_method_is_read_at_the_latest_checkpoint_its_compute_allows_and_not_before_its_first():
    points = [{"seconds": s} for s in (100.0, 200.0, 300.0)]
    assert compare.at_compute(points, 250.0) is points[1]
    assert compare.at_compute(points, 300.0) is points[2]
    assert compare.at_compute(points, 50.0) is None


def test_the_table_holds_every_method_at_gdros_whole_cost_and_at_twice_it_for_each_seed():
    point = lambda s, g: {"seconds": s, "images": 3200, "gain": g, "gain_se": 0.01}
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
    point = lambda s, g: {"seconds": s, "images": 1280, "gain": g, "gain_se": 0.015}
    runs = {m: [point(400.0, 0.0)] + [point(400.0 + 95 * k, -0.01 * k) for k in range(1, 5)] for m in compare.METHODS}
    runs["flow_grpo"] = [point(0.0, 0.0)] + [point(196.0 * f, 0.005 - 0.01 * f) for f in compare.FLOW_POINTS]
    compare.plot_results({"seeds": [0, 1], "runs": {"0": runs, "1": runs}}, tmp_path / "compare.png")
    from PIL import Image
    with Image.open(tmp_path / "compare.png") as image:
        assert image.size == (760, 460)
    assert (tmp_path / "compare.png").stat().st_size < 300_000
