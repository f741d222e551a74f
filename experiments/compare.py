"""The paper's headline on a CPU, decided by the rule in docs/experiments.md: does GDRO reach online Flow-GRPO's reward
at a fraction of its compute, each method tuned on val alike?

    python -m experiments.compare                  # the mode text model (built once), seeds 0 and 1
    python -m experiments.compare --seeds 1        # one seed; OUT/seed_0.json, if there, is read and decided with it
    python -m experiments.compare --recipe binding # the binding model (4 digits, all large; runs/text_binding)
    python -m experiments.compare --plot-only --plot docs/compare.png   # redraw the figure from OUT/seed_*.json

Per seed, on the same training strings (a fixed draw from the model's train split):
  gdro        GDRO, the paper's loss (k = 6 of 16, beta 12, tau 0.05, gamma 0.5), on a cache of 16 images a string
              drawn once by the frozen base (10 Euler steps, scored once)
  raft        beta = 0 on the same cache: flow matching on each group's best image
  flow_grpo   Flow-GRPO (experiments/flow_grpo.py): online SDE rollouts of the current policy every step, its CFG
              gradient as its code's (the unconditional branch detached), run to FLOW_BUDGET x C
  with --extra also dpo (k = 2 on the same cache) and gdro_unipc (GDRO on a cache drawn by UniPC in 5 steps).
Every method runs at the same learning rates (--lrs). Compute is counted alike (clocked): CPU seconds of a method's
processes from their start (an offline method: its cache's process, then its training process, which loads the
model again; Flow-GRPO: its one process), and images sampled. C is GDRO's whole cost on the seed (the cache and the
longer of its runs). The checkpoint grid is the same for all: at k C / GRID CPU seconds (k = 1 .. GRID, Flow-GRPO's to
2 GRID), each run's latest checkpoint at or below (none yet: the base).

Chosen on val only: every grid checkpoint is scored on the val strings (paired with the base on the same seeds); for
each method the (learning rate, checkpoint) best on val within its budget (C; for Flow-GRPO 0.5C, C and 2C: three
choices) is the one scored on the held-out test strings x held-out seeds, the same for every method, paired with the
base. Then the rule (decide), and the compute at which each method's val curve first reaches Flow-GRPO's best val
reward within 2C (reach). Every grid checkpoint's training-string reward (fresh images of a fixed few training
strings) is logged, and Flow-GRPO's KL and clip fraction each step, so that not optimising is told from not
generalising.

Runs of one seed are placed side by side, LANES at a time, one CPU thread each, so every method sees the same
machine load; the seeds run one after the other. Each stage is kept in OUT/seedS (a process's clock.json, eval.py's
scores.jsonl): a rerun after an interruption continues where it stopped. When a seed ends, OUT/seed_S.json (its
settings, val curves, chosen points, their compute and held-out gain +- se); then every seed_*.json in OUT is decided
together: OUT/results.json, OUT/table.md, OUT/compare.png, and the last line printed is that JSON.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

import experiments
import gdro
from experiments import run, text_model
from experiments.flow_grpo import FLOW_GRPO

ROOT = Path(__file__).resolve().parent.parent
LRS = (1e-3, 3e-3)  # every method's; Flow-GRPO's paper uses 3e-4 at alpha 64, this model took 3e-3 for GDRO
GRID = 8  # checkpoints per C: the grid is every C / GRID CPU seconds
FLOW_BUDGET = 2.0  # Flow-GRPO runs to twice GDRO's whole cost
FLOW_CHOICES = (0.5, 1.0, 2.0)  # Flow-GRPO's budgets, in units of C: one choice on val within each
RULE = {"z": 1.645, "margin": 0.02, "fail_se": 2.0}  # the lower 90 % bound of d above -margin; fails at > 2 se
LANES = 2  # processes side by side: the 2 cores the comparison was sized for
PART = 8  # LoRAs an eval.py call scores: what an interruption loses
CACHES = {"euler": {"sampler": "euler"}, "unipc": {"sampler": "unipc", "steps": 5}}
METHODS = {  # name -> (label, its cache or None for online, changes to run.OCR_GDRO, in the decision rule)
    "gdro": ("GDRO", "euler", {}),
    "raft": ("beta = 0 (best image)", "euler", {"beta": 0.0}),
    "flow_grpo": ("Flow-GRPO (online)", None, {}),
}
EXTRA = {  # --extra
    "dpo": ("k = 2 (Diffusion-DPO)", "euler", {"group-size": 2}),
    "gdro_unipc": ("GDRO (UniPC cache, 5 steps)", "unipc", {}),
}
# What each recipe trains on: the mode model as the --ocr experiment where GDRO learned (200 strings, 300 steps);
# the binding model as its first comparison (80 strings, 200 steps)
RECIPES = {"mode": {"model_dir": "runs/text_model", "recipe": text_model.TEXT_RECIPE,
                    "scale": {"train_prompts": 200, "gdro_steps": 300}},
           "binding": {"model_dir": "runs/text_binding", "recipe": text_model.BINDING_RECIPE,
                       "scale": {"train_prompts": 80, "gdro_steps": 200}}}
# The protocol's sizes (docs/experiments.md): val 100 strings x 4 images, held-out 100 x 6, training-string reward
# 20 x 2; a GDRO checkpoint every 5 steps (about 10 CPU s: C / GRID is minutes), Flow-GRPO's every step. The cache's
# images a string, Flow-GRPO's group and prompts a step, and the sampler steps shrink only for a smoke run.
SCALE = dict(train_prompts=200, gdro_steps=300, save_every=5, val_strings=100, val_images=4, heldout_strings=100,
             heldout_images=6, train_strings=20, train_images=2, cache_images=16, flow_group=24, flow_prompts=2,
             steps=10)
SCALE_RULES = {**{key: experiments.AT_LEAST_1 for key in SCALE}, "heldout_strings": experiments.AT_LEAST_2,
               "val_strings": experiments.AT_LEAST_2,
               "flow_group": experiments.AT_LEAST_2, "steps": experiments.AT_LEAST_2,
               "cache_images": experiments.AT_LEAST_2}
POLL_S = 0.5  # how often a run's CPU time is read: a checkpoint's is counted late by at most this
COMPUTE = ("cpu_seconds: CPU seconds of the method's processes from their start, one thread each (offline: the "
           "cache's process, then the training process to the checkpoint; Flow-GRPO: its process to the checkpoint); "
           "images: images sampled")


def cpu_seconds(pid):
    """User and system CPU seconds of process pid since it started, its waited-for children's included (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
    return sum(map(int, fields[11:15])) / os.sysconf("SC_CLK_TCK")  # utime, stime, cutime, cstime


def clocked(cmd, log, checkpoints=None):
    """Run cmd from the repository root on one CPU thread, its output appended to log, and count its compute as
    every method's is counted: {"cpu_seconds": the whole process's from its start (loading the models, rollouts,
    scoring, training), "steps": {step: its CPU seconds when checkpoints/step_N first appeared, within POLL_S}}.
    A failure stops with the log's name."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    steps = {}
    look = lambda cpu: [steps.setdefault(int(folder.name.removeprefix("step_")), round(cpu, 2))
                        for folder in (Path(checkpoints).glob("step_*") if checkpoints else ())]
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while not (done := os.wait4(proc.pid, os.WNOHANG))[0]:  # wait4, not poll: the child's rusage at its end
            look(cpu_seconds(proc.pid))
            time.sleep(POLL_S)
    _, status, usage = done
    proc.returncode = os.waitstatus_to_exitcode(status)
    look(usage.ru_utime + usage.ru_stime)  # checkpoints written since the last look
    if proc.returncode:
        raise SystemExit(f"error: failed: {' '.join(map(str, cmd))} (see {log})")
    return {"cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2), "steps": dict(sorted(steps.items()))}


def write_clock(folder, clock):
    (Path(folder) / "clock.json").write_text(json.dumps(clock, indent=1))


def read_clock(folder):
    clock = json.loads((Path(folder) / "clock.json").read_text())
    return {**clock, "steps": {int(step): cpu for step, cpu in clock["steps"].items()}}


def side_by_side(jobs, lanes=LANES):
    """Call each job (no arguments) LANES at a time, in order; their results in order."""
    with ThreadPoolExecutor(max(1, min(lanes, len(jobs)))) as pool:
        return list(pool.map(lambda job: job(), jobs))


def lr_key(lr):
    return f"{lr:g}"


# ----------------------------------------------------------------------------- the bookkeeping (tests/test_compare.py)

BASE = {"step": 0, "cpu_seconds": 0.0, "images": 0, "lora": None}  # before a run's first checkpoint: the base model


def offline_checkpoints(folder, cache_cpu, images):
    """An offline run's checkpoints with their compute: the cache's process, then the training process's CPU seconds
    when each checkpoint was written (the second process loads the model again: a little against them)."""
    return [{"step": step, "cpu_seconds": round(cache_cpu + cpu, 2), "images": images,
             "lora": str(Path(folder) / "checkpoints" / f"step_{step:06d}")}
            for step, cpu in read_clock(folder)["steps"].items()]


def flow_checkpoints(folder):
    """Flow-GRPO's checkpoints with their compute: its process's CPU seconds, and the images it had sampled."""
    images = {m["step"]: m["images_sampled"] for m in map(json.loads, (Path(folder) / "metrics.jsonl").open())}
    return [{"step": step, "cpu_seconds": cpu, "images": images[step],
             "lora": str(Path(folder) / "checkpoints" / f"step_{step:06d}")}
            for step, cpu in read_clock(folder)["steps"].items()]


def grid_points(checkpoints, c, points=GRID):
    """The run on the grid: for k = 1 .. points, its latest checkpoint at or below k C / GRID CPU seconds (the base
    if it has none yet), with the grid's compute as `at`."""
    out = []
    for k in range(1, points + 1):
        at = k * c / GRID
        within = [p for p in checkpoints if p["cpu_seconds"] <= at]
        out.append({"k": k, "at": round(at, 2), **(within[-1] if within else BASE)})
    return out


def choose(curves, budget, c):
    """The (learning rate, grid checkpoint) with the highest val reward among the checkpoints within budget C-units
    (k C / GRID <= budget C); the earliest of equals, then the first learning rate. curves: {lr: grid points, each
    with "val"}. Only "val" is read: a point's test figures, if any, never enter. None if no checkpoint is within."""
    found = [(p["k"], i, lr, p) for i, (lr, points) in enumerate(curves.items()) for p in points
             if p["lora"] and p["at"] <= budget * c * (1 + 1e-9)]
    if not found:
        return None
    best = max(p["val"] for _, _, _, p in found)
    _, _, lr, point = min((f for f in found if f[3]["val"] == best), key=lambda f: f[:2])
    return {"lr": lr, "budget": budget, **{key: point[key] for key in ("k", "at", "step", "cpu_seconds", "images",
                                                                         "lora", "val")}}


def best_curve(curves):
    """The method's val curve, the best learning rate at each grid point among its checkpoints: [{k, at, lr, val,
    cpu_seconds}] (a point where no learning rate has a checkpoint yet is left out)."""
    out = []
    for k in sorted({p["k"] for points in curves.values() for p in points}):
        here = [(p["val"], lr, p) for lr, points in curves.items() for p in points if p["k"] == k and p["lora"]]
        if here:
            val, lr, p = max(here, key=lambda x: x[0])
            out.append({"k": k, "at": p["at"], "lr": lr, "val": val, "cpu_seconds": p["cpu_seconds"]})
    return out


def reach(curves, target, c):
    """The least compute at which the method's val curve (best learning rate at each point) first reaches target:
    {k, at, fraction_of_c, cpu_seconds (of that checkpoint), lr, val}, or None: never."""
    for p in best_curve(curves):
        if p["val"] >= target:
            return {**p, "fraction_of_c": round(p["at"] / c, 4)}
    return None


def mean_of(per_string):
    """The mean reward of a set: every string has the same number of images, so the mean of the strings' means."""
    return round(float(np.mean(list(per_string.values()))), 5)


def paired(a, b):
    """a - b over the strings both hold ({prompt_index: mean reward of its images}): {mean, se, strings}."""
    keys = sorted(set(a) & set(b))
    d = np.array([a[i] - b[i] for i in keys])
    return {"mean": round(float(d.mean()), 5), "se": round(float(d.std(ddof=1) / math.sqrt(len(d))), 5),
            "strings": len(d)}


def seed_verdict(d_2c, d_c, rule=RULE):
    """One seed's conditions: holds (d = GDRO - Flow-GRPO within 2C: mean - z se > -margin) and fails (Flow-GRPO
    within C beats GDRO by more than fail_se standard errors: -d_C > fail_se se_C)."""
    lower = d_2c["mean"] - rule["z"] * d_2c["se"]
    return {"lower_90": round(lower, 5), "holds": bool(lower > -rule["margin"]),
            "fails": bool(-d_c["mean"] > rule["fail_se"] * d_c["se"])}


def decide(per_seed, seeds_needed=2):
    """The rule over the seeds: fails if it fails on any seed; else holds if it holds on every seed and there are
    seeds_needed of them; else undecided. Both conditions met on one seed counts as fails (a loss at equal compute
    beyond 2 se is not outweighed by a bound at twice it). per_seed: {seed: seed_verdict}."""
    if any(v["fails"] for v in per_seed.values()):
        return "fails"
    if len(per_seed) >= seeds_needed and all(v["holds"] for v in per_seed.values()):
        return "holds"
    return "undecided"


# ----------------------------------------------------------------------------- the runs of one seed

def gdro_settings(scale, lr, cache, change):
    return {**run.OCR_GDRO, "lr": lr, "max-steps": scale["gdro_steps"], "save-every": scale["save_every"],
            "log-every": scale["save_every"], "images-per-prompt": scale["cache_images"], "steps": scale["steps"],
            **CACHES[cache], **change}


def flow_settings(scale, lr):
    return {"lr": lr, "guidance": run.OCR_GDRO["guidance"], "group_size": scale["flow_group"],
            "prompts_per_step": scale["flow_prompts"], "steps": scale["steps"],
            "train_steps": min(FLOW_GRPO["train_steps"], scale["steps"] - 1)}


def train_runs(ctx, seed_dir, seed, log):
    """Every method's run for one seed: the caches, the offline runs, C, then Flow-GRPO to FLOW_BUDGET C.
    {method: {lr: checkpoints}}, C, the caches' CPU seconds."""
    scale, model_dir, prompts = ctx["scale"], ctx["model_dir"], ctx["prompts"]
    caches = sorted({cache for _, cache, _ in ctx["methods"].values() if cache})

    def cache_job(name):
        folder = seed_dir / f"cache_{name}"
        if not (folder / "clock.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            settings = {**gdro_settings(scale, LRS[0], name, {}), "max-steps": 0}
            write_clock(folder, clocked(run.gdro_command(model_dir, prompts, folder, seed, settings), log))
        return read_clock(folder)["cpu_seconds"]

    jobs = [lambda name=name: cache_job(name) for name in caches]
    if not (ctx["out"] / "val_base" / "scores.jsonl").is_file():  # the base's failure on val, beside the cache
        jobs.append(lambda: base_on_val(model_dir, ctx["out"], scale, ctx["out"] / "val_base.log"))
    cache_cpu = dict(zip(caches, side_by_side(jobs)))
    images = scale["train_prompts"] * scale["cache_images"]

    def offline_job(method, lr):
        _, cache, change = ctx["methods"][method]
        folder = seed_dir / method / lr_key(lr)
        if not (folder / "clock.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(seed_dir / f"cache_{cache}" / "cache", folder / "cache")
            cmd = run.gdro_command(model_dir, prompts, folder, seed, gdro_settings(scale, lr, cache, change))
            write_clock(folder, clocked(cmd, log, folder / "checkpoints"))
        return offline_checkpoints(folder, cache_cpu[cache], images)

    offline = [(m, lr) for m, (_, cache, _) in ctx["methods"].items() if cache for lr in ctx["lrs"]]
    found = dict(zip(offline, side_by_side([lambda m=m, lr=lr: offline_job(m, lr) for m, lr in offline])))
    runs = {m: {lr_key(lr): found[m, lr] for lr in ctx["lrs"]} for m, _ in offline}
    c = max(read_clock(seed_dir / "gdro" / lr_key(lr))["cpu_seconds"] for lr in ctx["lrs"]) + cache_cpu["euler"]

    def flow_job(lr):
        folder = seed_dir / "flow_grpo" / lr_key(lr)
        if not (folder / "clock.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            sets = [f"{k}={v}" for k, v in flow_settings(scale, lr).items()]
            clock = clocked([sys.executable, "-m", "experiments.flow_grpo", "--model", model_dir, "--prompts", prompts,
                             "--out", folder, "--seed", seed, "--max-cpu-seconds", round(FLOW_BUDGET * c, 1),
                             "--save-every", 1, "--max-steps", 10**6, "--set", *sets], log, folder / "checkpoints")
            write_clock(folder, clock)
        return flow_checkpoints(folder)

    runs["flow_grpo"] = dict(zip(map(lr_key, ctx["lrs"]), side_by_side([lambda lr=lr: flow_job(lr)
                                                                         for lr in ctx["lrs"]])))
    return runs, c, cache_cpu


def prune(seed_dir, keep):
    """Delete the checkpoints off the grid (Flow-GRPO saves one a step): the grid's are all that is scored, and
    clock.json, which the grid is read from, stays."""
    keep = set(map(str, keep))
    for folder in Path(seed_dir).glob("*/*/checkpoints/step_*"):
        if str(folder) not in keep:
            shutil.rmtree(folder)


def eval_cost(folder):
    """The CPU seconds of a scoring's eval.py calls and the images they drew (every set: the base and each LoRA)."""
    clocks = [json.loads(f.read_text()) for f in sorted(Path(folder).glob("part*/clock.json"))]
    return {"cpu_seconds": round(sum(c["cpu_seconds"] for c in clocks), 2), "calls": len(clocks),
            "images": sum(c["sets"] * c["images_per_set"] for c in clocks)}


def read_scores(scores_file):
    """eval.py's scores.jsonl as {set: {prompt_index: mean reward of its images}}."""
    rows = {}
    for line in Path(scores_file).read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["set"], {}).setdefault(r["prompt_index"], []).append(r["ocr_reward"])
    return {name: {i: float(np.mean(v)) for i, v in per.items()} for name, per in rows.items()}


def score_jobs(ctx, prompts, loras, folder, strings, images, log):
    """eval.py on the first `strings` prompts x `images` images, the base and every LoRA of loras, from the same seeds,
    in calls of at most PART LoRAs (each draws the base too), so that an interruption loses one call's work, not the
    stage's, and at least one a lane: (jobs, read) where read() gives {lora or "base": per string}."""
    n = max(min(LANES, len(loras)), math.ceil(len(loras) / PART))
    parts = [loras[i::n] for i in range(n)] or [[]]
    kept = {f"part{i}" for i in range(len(parts))}
    for stale in Path(folder).glob("part*"):  # an earlier, longer split's: not this scoring's cost
        if stale.name not in kept:
            shutil.rmtree(stale)

    def job(i):
        part = Path(folder) / f"part{i}"
        names = list(map(str, parts[i]))
        if not ((part / "scores.jsonl").is_file() and (part / "clock.json").is_file()
                and read_clock(part).get("loras") == names):
            shutil.rmtree(part, ignore_errors=True)
            cmd = run.eval_command(ctx["model_dir"], prompts, parts[i], part, run.OCR_GDRO["guidance"], images)
            clock = clocked(cmd + ["--max-prompts", strings, "--steps", ctx["scale"]["steps"]], log)
            write_clock(part, {**clock, "loras": names, "sets": 1 + len(names), "images_per_set": strings * images})

    def read():
        found = {}
        for i, part in enumerate(parts):
            scores = read_scores(Path(folder) / f"part{i}" / "scores.jsonl")
            found.setdefault("base", scores["base"])
            found.update({lora: scores["lora" if len(part) == 1 else f"lora{j + 1}"] for j, lora in enumerate(part)})
        return found

    return [lambda i=i: job(i) for i in range(len(parts))], read


def flow_log(folder):
    """Flow-GRPO's metrics.jsonl, step by step: its rollouts' reward, KL to the reference and clip fraction."""
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return {key: [round(r[key], 6) for r in rows] for key in ("step", "reward", "kl", "clipfrac", "cpu_seconds")}


def one_seed(ctx, seed):
    """The seed's runs, their val and training-string scores on the grid, the choices, the held-out scores of the
    chosen, the rule's figures: the dict of OUT/seed_S.json."""
    t0 = time.time()
    seed_dir, log = ctx["out"] / f"seed{seed}", ctx["out"] / f"seed{seed}.log"
    seed_dir.mkdir(parents=True, exist_ok=True)
    runs, c, cache_cpu = train_runs(ctx, seed_dir, seed, log)
    grids = {m: {lr: grid_points(points, c, round(GRID * (FLOW_BUDGET if m == "flow_grpo" else 1)))
                 for lr, points in per_lr.items()} for m, per_lr in runs.items()}
    loras = sorted({p["lora"] for per_lr in grids.values() for points in per_lr.values() for p in points
                    if p["lora"]})
    prune(seed_dir, loras)
    scale, model_dir = ctx["scale"], ctx["model_dir"]
    val_jobs, val = score_jobs(ctx, model_dir / "val.txt", loras, seed_dir / "eval_val", scale["val_strings"],
                               scale["val_images"], log)
    train_jobs, train = score_jobs(ctx, ctx["prompts"], loras, seed_dir / "eval_train", scale["train_strings"],
                                   scale["train_images"], log)
    side_by_side(val_jobs + train_jobs)
    val, train = val(), train()
    for per_lr in grids.values():
        for points in per_lr.values():
            for p in points:
                name = p["lora"] or "base"
                g = paired(val[name], val["base"]) if p["lora"] else {"mean": 0.0, "se": 0.0}
                p.update(val=mean_of(val[name]), val_gain=g["mean"], val_se=g["se"],
                         train_reward=mean_of(train[name]))
    chosen = {}  # nothing below reads a test figure until every choice is made
    for method, per_lr in grids.items():
        for budget in FLOW_CHOICES if method == "flow_grpo" else (1.0,):
            chosen[f"{method}@{budget:g}C" if method == "flow_grpo" else method] = choose(per_lr, budget, c)
    test_loras = sorted({p["lora"] for p in chosen.values() if p})
    test_jobs, test = score_jobs(ctx, model_dir / "test.txt", test_loras, seed_dir / "eval_test",
                                 scale["heldout_strings"], scale["heldout_images"], log)
    side_by_side(test_jobs)
    test = test()
    for p in chosen.values():
        if p:
            g = paired(test[p["lora"]], test["base"])
            p.update(heldout=mean_of(test[p["lora"]]), gain=g["mean"], gain_se=g["se"])
    figures = {}
    if chosen["gdro"] and chosen["flow_grpo@2C"] and chosen["flow_grpo@1C"]:
        d_2c = paired(test[chosen["gdro"]["lora"]], test[chosen["flow_grpo@2C"]["lora"]])
        d_c = paired(test[chosen["gdro"]["lora"]], test[chosen["flow_grpo@1C"]["lora"]])
        figures = {"d_vs_flow_grpo_2C": d_2c, "d_vs_flow_grpo_1C": d_c, **seed_verdict(d_2c, d_c)}
    flow_best = max((p["val"] for points in grids["flow_grpo"].values() for p in points if p["lora"]), default=None)
    reached = {m: reach(per_lr, flow_best, c) if flow_best is not None else None for m, per_lr in grids.items()}
    ratio = (reached["gdro"]["cpu_seconds"] / reached["flow_grpo"]["cpu_seconds"]
             if reached["gdro"] and reached["flow_grpo"] else None)
    return {"seed": seed, "settings": ctx["settings"], "C": round(c, 2), "cache_cpu_seconds": cache_cpu,
            "whole_cpu_seconds": {m: {lr: round(read_clock(seed_dir / m / lr)["cpu_seconds"]
                                              + (cache_cpu[ctx["methods"][m][1]] if ctx["methods"][m][1] else 0), 2)
                                      for lr in per_lr} for m, per_lr in runs.items()},
            "val_base": mean_of(val["base"]),
            "train_base": mean_of(train["base"]),
            "heldout_base": mean_of(test["base"]),
            "curves": grids, "best_curves": {m: best_curve(per_lr) for m, per_lr in grids.items()},
            "flow_grpo_log": {lr: flow_log(seed_dir / "flow_grpo" / lr) for lr in grids["flow_grpo"]},
            "chosen": chosen, **figures,
            "scoring_cpu": {name: eval_cost(seed_dir / f"eval_{name}") for name in ("val", "train", "test")},
            "reach": {"target": flow_best, **reached,
                      "gdro_over_flow_grpo": None if ratio is None else round(ratio, 4)},
            "wall_seconds": round(time.time() - t0)}


def base_on_val(model_dir, out, scale, log):
    """The base model's failure on the val strings (scale['val_images'] images each) and how often a group of its
    images has a tied best reward: what GDRO's ranking can use that copying the best image cannot."""
    from reward_ocr import OcrReward, ocr_target
    folder = out / "val_base"
    if not (folder / "scores.jsonl").is_file():
        cmd = run.eval_command(model_dir, Path(model_dir) / "val.txt", [], folder, run.OCR_GDRO["guidance"],
                               scale["val_images"])
        clocked(cmd + ["--max-prompts", scale["val_strings"], "--steps", scale["steps"]], log)
    rows = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    reader, kinds, groups = OcrReward(), {}, {}
    for r in rows:
        target = ocr_target(r["prompt"])
        with Image.open(folder / r["image"]) as image:
            read = "".join(reader.read(image).split())
        kind = ("exact" if read == target else "nothing read" if not read else
                "wrong length" if len(read) != len(target) else
                "right digits, wrong order" if sorted(read) == sorted(target) else "wrong digits")
        kinds[kind] = kinds.get(kind, 0) + 1
        groups.setdefault(r["prompt_index"], []).append(r["ocr_reward"])
    tied = [sum(x == max(g) for x in g) > 1 for g in groups.values()]
    return {"strings": len(groups), "images_per_string": scale["val_images"],
            "ocr": float(np.mean([r["ocr_reward"] for r in rows])),
            "reads": {k: round(v / len(rows), 4) for k, v in sorted(kinds.items())},
            "groups_with_tied_best": float(np.mean(tied)),
            "distinct_rewards_per_group": float(np.mean([len(set(g)) for g in groups.values()]))}


# ----------------------------------------------------------------------------- every seed together

def read_seeds(out):
    """{seed: its seed_S.json} of every seed finished in out."""
    found = {}
    for f in Path(out).glob("seed_*.json"):
        data = json.loads(f.read_text())
        found[data["seed"]] = data
    return dict(sorted(found.items()))


def summarise(seeds):
    """Every seed's figures decided together: the verdict, each seed's conditions, the compute ratios."""
    verdicts = {s: {k: d[k] for k in ("lower_90", "holds", "fails")} for s, d in seeds.items() if "holds" in d}
    return {"rule": {**RULE, "flow_choices_in_C": FLOW_CHOICES, "grid_per_C": GRID, "lrs": LRS},
            "verdict": decide(verdicts) if len(verdicts) == len(seeds) else "undecided",
            "seeds": list(seeds), "per_seed": verdicts,
            "chosen": {s: d["chosen"] for s, d in seeds.items()},
            "reach": {s: d["reach"] for s, d in seeds.items()}, "C": {s: d["C"] for s, d in seeds.items()}}


def table(seeds):
    """Markdown: per seed, each method's chosen setting, its cost and its held-out gain; then d and the rule."""
    lines = ["| seed | method (budget) | lr | step | compute: CPU s (x C), images | val | held-out gain +- se |",
             "|" + " --- |" * 7]
    for s, d in seeds.items():
        for name, p in d["chosen"].items():
            if p is None:
                lines.append(f"| {s} | {name} | - | - | none within the budget | - | - |")
                continue
            lines.append(f"| {s} | {name} | {p['lr']} | {p['step']} | {p['cpu_seconds']:.0f} "
                         f"({p['cpu_seconds'] / d['C']:.2f}), {p['images']} | {p['val']:.3f} "
                         f"| {p['gain']:+.3f} +- {p['gain_se']:.3f} |")
    lines.append("")
    for s, d in seeds.items():
        if "holds" not in d:
            continue
        a, b = d["d_vs_flow_grpo_2C"], d["d_vs_flow_grpo_1C"]
        r = d["reach"]
        when = lambda x: "never" if x is None else f"{x['cpu_seconds']:.0f} CPU s ({x['fraction_of_c']:.2f} C)"
        lines.append(f"- seed {s}: C = {d['C']:.0f} CPU s; d (GDRO - Flow-GRPO within 2C) {a['mean']:+.4f} +- "
                     f"{a['se']:.4f}, lower 90 % bound {d['lower_90']:+.4f} (holds: {d['holds']}); GDRO - Flow-GRPO "
                     f"within C {b['mean']:+.4f} +- {b['se']:.4f} (fails: {d['fails']}); Flow-GRPO's best val "
                     f"{r['target']:.4f} reached by GDRO at {when(r['gdro'])}, by Flow-GRPO at {when(r['flow_grpo'])}")
    lines.append(f"\nverdict: {summarise(seeds)['verdict']}")
    return "\n".join(lines)


def plot_results(seeds, path):
    """Val reward against CPU seconds, a panel per seed: a line per method at its chosen learning rate (Flow-GRPO's
    chosen within 2C), the grid's points from its first checkpoint, the chosen points marked (Flow-GRPO's three)."""
    import matplotlib
    matplotlib.use("Agg")  # a file, never a window: the comparison runs on machines without a display
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.2 * len(seeds), 4.2), dpi=90, squeeze=False)
    for ax, (s, d) in zip(axes[0], seeds.items()):
        ax.axhline(d["val_base"], color="0.6", linewidth=1, label="the base")
        for i, (method, curves) in enumerate(d["curves"].items()):
            key = "flow_grpo@2C" if method == "flow_grpo" else method
            if not d["chosen"].get(key):
                continue
            points = [p for p in curves[d["chosen"][key]["lr"]] if p["lora"]]
            colour = f"C{i}"
            ax.plot([p["cpu_seconds"] for p in points], [p["val"] for p in points], marker="o", markersize=3,
                    color=colour, linewidth=1.3,
                    label=f"{d['settings']['methods'][method]['label']} (lr {d['chosen'][key]['lr']})")
            for name, p in d["chosen"].items():
                if p and name.split("@")[0] == method:
                    ax.plot(p["cpu_seconds"], p["val"], marker="*", markersize=12, color=colour,
                            markeredgecolor="black", linestyle="none")
        for f in (1.0, FLOW_BUDGET):
            ax.axvline(f * d["C"], color="0.8", linestyle="--", linewidth=1)
        ax.set_title(f"seed {s} (C = {d['C']:.0f} CPU s; stars: chosen on val)", fontsize=9)
        ax.set_xlabel("compute: CPU seconds of the whole run")
        ax.set_ylabel("val OCR reward")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command line

def split_sizes(model_dir, recipe):
    """{split: strings} of the text model in model_dir, or of the recipe's, which main builds there."""
    if (Path(model_dir) / "text_model.json").is_file():
        return {name: len(Path(model_dir, f"{name}.txt").read_text().splitlines()) for name in ("train", "val", "test")}
    r = RECIPES[recipe]["recipe"]
    return {name: len(strings) for name, strings in text_model.text_strings(r["seed"], r["length"]).items()}


def check_inputs(args):
    """Every flag, before the model is built or any run starts: ({scale}, the plot's path)."""
    experiments.check_out(args.out)
    plot = Path(args.plot or Path(args.out) / "compare.png")
    experiments.check_out(plot.parent, "--plot")
    experiments.check(("--plot", plot, (lambda x: x.suffix.lower() in (".png", ".svg", ".pdf") and not x.is_dir(),
                                        "a .png, .svg or .pdf file")))
    if args.plot_only:
        if not any(Path(args.out).glob("seed_*.json")):
            raise gdro.BadInput(f"--plot-only: no seed_*.json in {args.out}; run the comparison first "
                                "(or give the --out it wrote)")
        return None, plot
    if not Path("/proc/self/stat").is_file():
        raise gdro.BadInput("the comparison reads each run's CPU seconds from /proc: it runs on Linux")
    experiments.check(*[("--seeds", seed, experiments.AT_LEAST_0) for seed in args.seeds],
                      ("--seeds", args.seeds, (lambda x: len(set(x)) == len(x), "distinct")),
                      *[("--lrs", lr, experiments.POSITIVE) for lr in args.lrs],
                      ("--lrs", args.lrs, (lambda x: len(set(x)) == len(x), "distinct")))
    args.model_dir = args.model_dir or RECIPES[args.recipe]["model_dir"]
    experiments.check_model_dir(args.model_dir, RECIPES[args.recipe]["model_dir"],
                                f"python -m experiments.text_model --recipe {args.recipe}")
    scale = {**SCALE, **RECIPES[args.recipe]["scale"], **experiments.key_values("--scale", args.scale, SCALE,
                                                                                  SCALE_RULES)}
    sizes = split_sizes(args.model_dir, args.recipe)
    experiments.check(*[(f"--scale {key}=", scale[key], experiments.at_most(sizes[split], f"the {split} strings"))
                        for key, split in (("train_prompts", "train"), ("val_strings", "val"),
                                           ("heldout_strings", "test"))],
                      ("--scale train_strings=", scale["train_strings"],
                       experiments.at_most(scale["train_prompts"], "the training strings (train_prompts)")),
                      ("--scale cache_images=", scale["cache_images"], (lambda x: x >= run.OCR_GDRO["group-size"],
                                                                        "at least GDRO's group of 6")),
                      ("--scale flow_prompts=", scale["flow_prompts"],
                       experiments.at_most(scale["train_prompts"], "the training strings (train_prompts)")))
    return scale, plot


def settings_of(args, scale):
    """What a seed's runs depend on: two seeds are decided together only if theirs are equal."""
    methods = {**METHODS, **(EXTRA if args.extra else {})}
    return {"recipe": args.recipe, "model_dir": str(args.model_dir), "scale": scale, "lrs": list(args.lrs),
            "grid_per_C": GRID, "flow_budget_C": FLOW_BUDGET, "flow_choices_C": list(FLOW_CHOICES), "rule": RULE,
            "methods": {m: {"label": label, "cache": cache, "changes": change}
                        for m, (label, cache, change) in methods.items()},
            "gdro": gdro_settings(scale, None, "euler", {}), "flow_grpo": {**FLOW_GRPO, **flow_settings(scale, None)},
            "compute": COMPUTE}


def finish(out, plot):
    """Every finished seed decided together: results.json, table.md, the figure; returns the results."""
    seeds = read_seeds(out)
    results = {**summarise(seeds), "per_seed_results": {s: d for s, d in seeds.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(seeds) + "\n")
    plot_results(seeds, plot)
    return results


def main(argv=None):
    p = experiments.Parser(description="GDRO vs Flow-GRPO and beta = 0, each tuned on val alike, decided by the rule "
                                       "in docs/experiments.md (CPU text model).")
    p.add_argument("--out", default="runs/compare", help="run folder (default: %(default)s)")
    p.add_argument("--recipe", choices=RECIPES, default="mode",
                   help="the text model: mode (3 digits; runs/text_model) or binding (4 digits; runs/text_binding)")
    p.add_argument("--model-dir", help="a text model's folder; the recipe's is built there if it holds none")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="seeds to run, one after the other; those already in OUT (seed_S.json) are decided with them")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS), help="every method's learning rates")
    p.add_argument("--extra", action="store_true", help="also k = 2 and GDRO on a UniPC cache")
    p.add_argument("--scale", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change a SCALE value, e.g. gdro_steps=100")
    p.add_argument("--plot", help="the figure (default: OUT/compare.png)")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the figure and print the table from OUT/seed_*.json")
    args = p.parse_args(argv)
    scale, plot = check_inputs(args)
    out = Path(args.out)
    if args.plot_only:
        seeds = read_seeds(out)  # what results.json's per_seed_results holds, read from the seeds' own files
        plot_results(seeds, plot)
        return print(table(seeds))
    settings = settings_of(args, scale)
    for s, earlier in read_seeds(out).items():
        if earlier["settings"] != json.loads(json.dumps(settings)):
            raise gdro.BadInput(f"{out / f'seed_{s}.json'} was run with other settings; use another --out, or the "
                                "same flags")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)
    if not (model_dir / "text_model.json").is_file():
        text_model.build_text_model(model_dir, RECIPES[args.recipe]["recipe"])
    prompts, _, _ = run.ocr_prompt_files(out, model_dir, scale["train_prompts"])
    ctx = {"out": out, "model_dir": model_dir, "prompts": prompts, "scale": scale, "lrs": args.lrs,
           "methods": {**METHODS, **(EXTRA if args.extra else {})}, "settings": settings}
    for seed in args.seeds:
        if (out / f"seed_{seed}.json").is_file():
            continue  # finished by an earlier session: decided with the others below
        result = one_seed(ctx, seed)
        (out / f"seed_{seed}.json").write_text(json.dumps(result, indent=1))
        print(f"seed {seed} done: {out / f'seed_{seed}.json'}", flush=True)
    results = finish(out, plot)
    print(table(read_seeds(out)))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    gdro.cli(main)
