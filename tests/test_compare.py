"""The comparison's bookkeeping (experiments/compare.py), on hand-made runs and curves: each run's compute, the
checkpoint grid in CPU seconds, the choice on val within each budget (never reading a test figure), the decision
rule of docs/experiments.md, the compute at which a val curve reaches Flow-GRPO's best, and the per-seed JSON a
later session continues from. The comparison itself is `python -m experiments.compare`; one smoke run of it end to
end on the toy text model is marked slow."""
import json
import re
import sys
from pathlib import Path

import pytest

import gdro
from experiments import compare


def write_run(folder, clock, metrics=()):
    """A run's folder as compare leaves it: clock.json ({step: CPU seconds}) and metrics.jsonl."""
    folder.mkdir(parents=True)
    compare.write_clock(folder, {"cpu_seconds": max(clock.values(), default=0.0), "steps": clock})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_an_offline_methods_compute_is_its_caches_process_then_its_training_process_to_each_checkpoint(tmp_path):
    write_run(tmp_path / "gdro", {50: 140.5, 100: 236.0})  # the training process, from its start (model loading)
    points = compare.offline_checkpoints(tmp_path / "gdro", cache_cpu=400.0, images=1280)
    assert [(p["step"], p["cpu_seconds"], p["images"]) for p in points] == [(50, 540.5, 1280), (100, 636.0, 1280)]
    assert points[1]["lora"].endswith("checkpoints/step_000100")


def test_flow_grpos_checkpoints_carry_its_processs_cpu_seconds_and_the_images_sampled_by_then(tmp_path):
    clock = {s: 30.0 * s for s in range(1, 5)}
    write_run(tmp_path / "flow", clock, [{"step": s, "images_sampled": 48 * s} for s in clock])
    points = compare.flow_checkpoints(tmp_path / "flow")
    assert [(p["step"], p["cpu_seconds"], p["images"]) for p in points] == [(s, 30.0 * s, 48 * s) for s in clock]


def test_the_grid_is_each_runs_latest_checkpoint_at_or_below_every_eighth_of_c_and_the_base_before_its_first():
    checkpoints = [{"step": s, "cpu_seconds": 600.0 + 10 * s, "images": 3200, "lora": f"step_{s}"}
                   for s in range(5, 301, 5)]  # a cache of 600 CPU s, then 10 s a step
    grid = compare.grid_points(checkpoints, c=3600.0)  # C / 8 = 450 s
    assert [p["k"] for p in grid] == list(range(1, 9)) and [p["at"] for p in grid] == [450.0 * k for k in range(1, 9)]
    assert [p["step"] for p in grid] == [0, 30, 75, 120, 165, 210, 255, 300]
    assert grid[0]["lora"] is None and grid[0]["cpu_seconds"] == 0.0  # the cache not done: still the base
    assert all(p["cpu_seconds"] <= p["at"] for p in grid)
    flow = compare.grid_points([{"step": s, "cpu_seconds": 100.0 * s, "images": 48 * s, "lora": f"step_{s}"}
                                for s in range(1, 75)], c=3600.0, points=16)  # Flow-GRPO: to 2C
    assert [p["step"] for p in flow] == [4 * k + k // 2 for k in range(1, 17)]  # 450 k // 100
    assert flow[-1]["at"] == 7200.0


class Sealed(dict):
    """A grid point whose test figures may not be read: a choice that looks at them fails."""
    def __getitem__(self, key):
        if key in ("heldout", "gain", "gain_se"):
            raise AssertionError(f"the choice read {key}, a test figure")
        return super().__getitem__(key)


def curve(c, vals, test_gains, lr_tag):
    """Grid points at k C / 8 with the given val rewards (None: the base, no checkpoint yet) and test gains that
    would choose otherwise."""
    return [Sealed(k=k, at=k * c / 8, step=10 * k if v is not None else 0, cpu_seconds=k * c / 8 - 1, images=48 * k,
                   lora=f"{lr_tag}/step_{k}" if v is not None else None, val=v if v is not None else 0.2,
                   heldout=g, gain=g, gain_se=0.01)
            for k, (v, g) in enumerate(zip(vals, test_gains), start=1)]


def test_the_val_choice_respects_each_budget_and_never_reads_a_test_figure():
    c = 800.0
    # Flow-GRPO's two learning rates over 2C: its best val is past C at lr 3e-3; test would pick early points
    low = curve(c, [0.21, 0.25, 0.30, 0.26, 0.27, 0.28, 0.29, 0.31] + [0.30] * 8, [0.9] + [0.0] * 15, "a")
    high = curve(c, [0.22, 0.24, 0.26, 0.33, 0.32, 0.30, 0.35, 0.34, 0.30, 0.36] + [0.2] * 6, [0.0] * 16, "b")
    curves = {"0.001": low, "0.003": high}
    half, one, two = (compare.choose(curves, budget, c) for budget in (0.5, 1.0, 2.0))
    assert (half["lr"], half["k"], half["val"]) == ("0.003", 4, 0.33)  # within 0.5C: k <= 4
    assert (one["lr"], one["k"], one["val"]) == ("0.003", 7, 0.35)
    assert (two["lr"], two["k"], two["val"]) == ("0.003", 10, 0.36)
    assert all(p["at"] <= b * c for p, b in ((half, 0.5), (one, 1.0), (two, 2.0)))
    assert not any(key in p for p in (half, one, two) for key in ("heldout", "gain", "gain_se"))
    # ties: the earliest point, then the first learning rate; the base (no checkpoint) is never chosen
    tied = {"0.001": curve(c, [None, 0.3, 0.3], [0] * 3, "a"), "0.003": curve(c, [None, 0.3, 0.4], [0] * 3, "b")}
    assert compare.choose(tied, 0.25, c)["lora"] == "a/step_2"
    assert compare.choose({"0.001": curve(c, [None, None], [0, 0], "a")}, 1.0, c) is None
    assert compare.choose(tied, 0.125, c) is None  # within C / 8 only the base


def d(mean, se):
    return {"mean": mean, "se": se, "strings": 100}


def test_the_decision_rule_as_written_holds_fails_or_is_undecided():
    holds = compare.seed_verdict(d(-0.005, 0.008), d(0.01, 0.01))  # lower bound -0.0182 > -0.02
    assert holds == {"lower_90": -0.01816, "holds": True, "fails": False}
    short = compare.seed_verdict(d(-0.006, 0.009), d(0.0, 0.01))  # lower bound -0.0208: not above -0.02
    assert not short["holds"] and not short["fails"]
    lost = compare.seed_verdict(d(-0.03, 0.01), d(-0.025, 0.012))  # Flow-GRPO within C ahead by 2.08 se
    assert lost["fails"] and not lost["holds"]
    assert not compare.seed_verdict(d(-0.03, 0.01), d(-0.024, 0.012))["fails"]  # exactly 2 se: not more
    assert compare.decide({0: holds, 1: holds}) == "holds"
    assert compare.decide({0: holds}) == "undecided"  # holding on one seed of the two the rule asks for
    assert compare.decide({0: holds, 1: short}) == "undecided"
    assert compare.decide({0: holds, 1: lost}) == "fails"  # on either seed
    assert compare.decide({0: lost}) == "fails"
    both = compare.seed_verdict(d(-0.001, 0.004), d(-0.012, 0.005))  # both conditions: counted as fails
    assert both["holds"] and both["fails"] and compare.decide({0: both, 1: holds}) == "fails"


def test_the_compute_ratio_is_where_each_val_curve_best_lr_at_each_point_first_reaches_flow_grpos_best():
    c = 800.0
    flow = {"0.001": curve(c, [0.21, 0.25, 0.30, 0.26] + [0.27] * 12, [0] * 16, "a"),
            "0.003": curve(c, [0.22, 0.24, 0.26, 0.33, 0.32, 0.30, 0.35, 0.34] + [0.2] * 8, [0] * 16, "b")}
    gdro_curves = {"0.001": curve(c, [None] * 5 + [0.30, 0.36, 0.31], [0] * 8, "g"),
                   "0.003": curve(c, [None] * 5 + [0.34, 0.33, 0.30], [0] * 8, "h")}
    best = compare.best_curve(gdro_curves)
    assert [(p["k"], p["lr"], p["val"]) for p in best] == [(6, "0.003", 0.34), (7, "0.001", 0.36), (8, "0.001", 0.31)]
    target = max(p["val"] for points in flow.values() for p in points if p["lora"])
    assert target == 0.35
    found = compare.reach(gdro_curves, target, c)
    assert (found["k"], found["lr"], found["fraction_of_c"]) == (7, "0.001", 0.875)
    assert compare.reach(flow, target, c)["k"] == 7
    assert compare.reach({"0.001": curve(c, [0.3] * 8, [0] * 8, "r")}, target, c) is None  # never


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


def test_scoring_is_split_into_calls_of_part_loras_and_a_rerun_redoes_only_the_unfinished_ones(tmp_path, monkeypatch):
    calls = []

    def fake_eval(cmd, log):  # eval.py's scores.jsonl: each set's reward, the LoRAs named lora1.. in order
        out = Path(cmd[cmd.index("--out") + 1])
        loras = cmd[cmd.index("--lora") + 1:cmd.index("--out")] if "--lora" in cmd else []  # [] : the base alone
        calls.append(loras)
        out.mkdir(parents=True)
        sets = {"base": 0.0, **{f"lora{j + 1}" if len(loras) > 1 else "lora": float(name) for j, name in
                                enumerate(loras)}}
        (out / "scores.jsonl").write_text("".join(json.dumps({"set": s, "prompt_index": 0, "ocr_reward": r}) + "\n"
                                                  for s, r in sets.items()))
        return {"cpu_seconds": 1.0, "steps": {}}

    monkeypatch.setattr(compare, "clocked", fake_eval)
    ctx = {"model_dir": tmp_path, "scale": {"steps": 2}}
    loras = [str(i) for i in range(2 * compare.PART + 1)]
    jobs, read = compare.score_jobs(ctx, tmp_path / "val.txt", loras, tmp_path / "eval", 1, 1, tmp_path / "log")
    compare.side_by_side(jobs)
    assert len(calls) == 3 and max(map(len, calls)) <= compare.PART and sorted(sum(calls, [])) == sorted(loras)
    assert read() == {"base": {0: 0.0}, **{name: {0: float(name)} for name in loras}}
    assert compare.eval_cost(tmp_path / "eval")["images"] == len(loras) + 3  # each call draws the base too
    (tmp_path / "eval" / "part1" / "clock.json").unlink()  # killed after its scores, before its clock
    calls.clear()
    compare.side_by_side(compare.score_jobs(ctx, tmp_path / "val.txt", loras, tmp_path / "eval", 1, 1, "log")[0])
    assert calls == [loras[1::3]]
    calls.clear()  # the same folder asked for other LoRAs: every part is redone
    compare.side_by_side(compare.score_jobs(ctx, tmp_path / "val.txt", loras[1:], tmp_path / "eval", 1, 1, "log")[0])
    assert sorted(sum(calls, [])) == sorted(loras[1:])
    calls.clear()  # fewer LoRAs in the same folder: fewer parts, and the cost counts only this scoring's calls
    compare.side_by_side(compare.score_jobs(ctx, tmp_path / "val.txt", loras[:2], tmp_path / "eval", 1, 1, "log")[0])
    assert sorted(sum(calls, [])) == loras[:2] and compare.eval_cost(tmp_path / "eval")["calls"] == 2
    calls.clear()  # fewer LoRAs than PART: still one call a lane
    compare.side_by_side(compare.score_jobs(ctx, tmp_path / "val.txt", loras[:3], tmp_path / "few", 1, 1, "log")[0])
    assert sorted(map(len, calls)) == [1, 2]
    calls.clear()  # the base alone: one call, kept when done
    for _ in range(2):
        compare.side_by_side(compare.score_jobs(ctx, tmp_path / "val.txt", [], tmp_path / "base", 1, 1, "log")[0])
    assert calls == [[]]


def fake_model(folder):
    """A folder that passes for a built text model: its record and its splits' prompt files."""
    folder.mkdir()
    (folder / "text_model.json").write_text("{}")
    for name, strings in (("train", range(200, 1000)), ("val", range(100)), ("test", range(100, 200))):
        (folder / f"{name}.txt").write_text("".join(f'the text "{i:03d}"\n' for i in strings))
    return folder


def fake_seed(ctx, seed):
    """What one_seed returns, hand-made: GDRO and Flow-GRPO close (seed 0) or Flow-GRPO ahead (seed 1)."""
    c = 1000.0
    point = lambda m, k, v: {"k": k, "at": k * c / 8, "step": k, "cpu_seconds": k * c / 8 - 5, "images": 48 * k,
                             "lora": f"{m}/step_{k}", "val": v}
    curves = {m: {"0.001": [point(m, k, 0.3 + 0.001 * k) for k in range(1, 9 if m != "flow_grpo" else 17)]}
              for m in ctx["methods"]}
    chosen = {"gdro": point("gdro", 8, 0.308), "raft": point("raft", 8, 0.308)}
    chosen.update({f"flow_grpo@{b:g}C": point("flow_grpo", round(8 * b), 0.3 + 0.001 * round(8 * b))
                   for b in compare.FLOW_CHOICES})
    for p in chosen.values():
        p.update(lr="0.001", gain=0.1, gain_se=0.01)
    d_2c, d_c = (d(-0.004, 0.008), d(0.0, 0.008)) if seed == 0 else (d(-0.04, 0.01), d(-0.03, 0.01))
    return {"seed": seed, "settings": ctx["settings"], "C": c, "val_base": 0.25, "curves": curves, "chosen": chosen,
            "d_vs_flow_grpo_2C": d_2c, "d_vs_flow_grpo_1C": d_c, **compare.seed_verdict(d_2c, d_c),
            "reach": {"target": 0.316, "gdro": None, "flow_grpo": {"cpu_seconds": 1995.0, "fraction_of_c": 2.0},
                      "gdro_over_flow_grpo": None}}


def test_each_seed_is_written_when_it_ends_and_a_later_session_adds_the_other(tmp_path, monkeypatch, capsys):
    model, out, ran = fake_model(tmp_path / "model"), tmp_path / "out", []
    monkeypatch.setattr(compare, "one_seed", lambda ctx, seed: ran.append(seed) or fake_seed(ctx, seed))
    first = compare.main(["--out", str(out), "--model-dir", str(model), "--seeds", "0"])
    assert ran == [0] and first["seeds"] == [0] and first["verdict"] == "undecided"  # holds on one seed of two
    saved = json.loads((out / "seed_0.json").read_text())
    capsys.readouterr()
    both = compare.main(["--out", str(out), "--model-dir", str(model), "--seeds", "1"])
    assert ran == [0, 1] and both["seeds"] == [0, 1]  # seed 0 read from its file, not run again
    assert json.loads((out / "seed_0.json").read_text()) == saved
    assert both["verdict"] == "fails" and both["per_seed"][0]["holds"] and both["per_seed"][1]["fails"]
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line: every figure
    assert last["verdict"] == "fails" and set(last["per_seed_results"]) == {"0", "1"}
    assert (out / "compare.png").stat().st_size < 300_000
    assert "| 1 | flow_grpo@0.5C | 0.001 | 4 |" in (out / "table.md").read_text()
    compare.main(["--out", str(out), "--model-dir", str(model), "--seeds", "0", "1"])
    assert ran == [0, 1]  # both finished: nothing runs, the decision is redone from the files
    capsys.readouterr()
    compare.main(["--out", str(out), "--plot-only", "--plot", str(tmp_path / "again.png")])
    assert capsys.readouterr().out == (out / "table.md").read_text() and (tmp_path / "again.png").is_file()
    with pytest.raises(gdro.BadInput, match="seed_0.json was run with other settings"):  # not decided together
        compare.main(["--out", str(out), "--model-dir", str(model), "--seeds", "2", "--lrs", "1e-4"])
    assert ran == [0, 1]


TOY_MODEL = {"variants": 1, "vae_steps": 2, "vae_batch": 4, "steps": 3, "batch": 4, "layers": 1, "train_strings": 16}
SMOKE = ["train_prompts=2", "gdro_steps=4", "save_every=1", "val_strings=2", "val_images=2", "heldout_strings=2",
         "heldout_images=2", "train_strings=2", "train_images=1", "cache_images=6", "flow_group=2", "flow_prompts=1",
         "steps=2"]


@pytest.mark.experiment
def test_a_smoke_run_end_to_end_on_the_toy_text_model(tmp_path, capsys):
    """Every stage for real at a toy scale: the cache, GDRO and beta = 0 at two learning rates, Flow-GRPO to 2C,
    every grid checkpoint on val and training strings, the chosen on held-out strings, the rule; about a minute or
    two of CPU."""
    from experiments import text_model
    model = text_model.build_text_model(tmp_path / "model", TOY_MODEL)
    out = tmp_path / "out"
    results = compare.main(["--out", str(out), "--model-dir", str(model), "--seeds", "0", "--scale", *SMOKE])
    seed = json.loads((out / "seed_0.json").read_text())
    c = seed["C"]
    assert set(seed["chosen"]) == {"gdro", "raft", "flow_grpo@0.5C", "flow_grpo@1C", "flow_grpo@2C"}
    for name, p in seed["chosen"].items():
        budget = float(name.split("@")[1][:-1]) if "@" in name else 1.0
        assert p is None or (p["at"] <= budget * c + 1e-6 and p["cpu_seconds"] <= p["at"]), (name, p)
    for method, per_lr in seed["curves"].items():
        assert set(per_lr) == {"0.001", "0.003"}
        assert all(len(points) == (16 if method == "flow_grpo" else 8) for points in per_lr.values())
        assert all("val" in p and "train_reward" in p for points in per_lr.values() for p in points)
    assert {"kl", "clipfrac", "reward"} <= set(seed["flow_grpo_log"]["0.001"])
    kept = {p.name for p in (out / "seed0" / "flow_grpo" / "0.001" / "checkpoints").iterdir()}
    assert kept == {f"step_{p['step']:06d}" for p in seed["curves"]["flow_grpo"]["0.001"] if p["lora"]}  # pruned
    assert results["verdict"] in ("holds", "fails", "undecided") and results["seeds"] == [0]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verdict"] == results["verdict"]
    assert (out / "compare.png").stat().st_size < 300_000
