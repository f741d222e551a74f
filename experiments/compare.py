"""The paper's headline on a CPU: GDRO against online Flow-GRPO and the simple baselines, at equal compute.

    python -m experiments.compare                 # the binding text model (once), both seeds: JSON on the last line
    python -m experiments.compare --scale gdro_steps=100 heldout_strings=20    # smaller, to try it

The task is the binding text model (text_model.BINDING_RECIPE: 4-digit strings, every render large), whose failure is
legible digits that are the wrong ones or in the wrong place: copying each group's best image does not remove it,
and with 5 reward values per image fewer groups tie than on 3 digits. Before the comparison, the base model on the
val strings: its failure (how often it reads exactly, the right digits in the wrong order, a wrong length, nothing)
and how often a group of k = 6 images has a tied best reward (val_base in the JSON).

Each method, per seed (the seeds side by side, one CPU thread each), on the same 80 training strings:
  gdro        GDRO, the paper's loss, on a cache of 16 images per string (10 Euler steps, scored once)
  gdro_unipc  the same on a cache drawn by UniPC in 5 steps (sampler independence)
  flow_grpo   Flow-GRPO: online SDE rollouts of the current policy each step (experiments/flow_grpo.py), run for
              FLOW_BUDGET times this seed's whole GDRO cost
  raft        beta = 0 on the Euler cache: flow matching on each group's best image (rejection sampling, RAFT)
  dpo         k = 2 on the Euler cache (Diffusion-DPO)
Every method has the same LoRA (rank 32), its paper's settings, and the same learning rate 3e-3 (both papers use
3e-4 on their models; this small model took 10x that for GDRO on the first text model): none is tuned on val here,
so each had one run per seed. Each checkpoint is scored on the held-out strings x held-out seeds (the same images'
seeds for base and every LoRA) against its compute, counted alike for every method: the CPU seconds of its
processes from their start, each on one thread (an offline method: the cache's process, loading the models,
drawing and scoring; then the training process to the checkpoint, loading the model again; Flow-GRPO: its one
process, loading, rollouts, scoring and updates), and the images it sampled; the seeds' runs side by side share
the machine alike. The figures: OUT/results.json and OUT/compare.png; the docs' figure is redrawn with
    python -m experiments.compare --plot-only --plot docs/compare.png
"""
import json
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
LR = 3e-3  # every method's
CACHES = {"euler": {"sampler": "euler", "steps": 10}, "unipc": {"sampler": "unipc", "steps": 5}}
METHODS = {  # name -> (label, the cache it trains on or None for online, changes to run.OCR_GDRO)
    "gdro": ("GDRO (Euler cache)", "euler", {}),
    "gdro_unipc": ("GDRO (UniPC cache, 5 steps)", "unipc", {}),
    "flow_grpo": ("Flow-GRPO (online)", None, {}),
    "raft": ("best image, beta = 0 (RAFT)", "euler", {"beta": 0.0}),
    "dpo": ("k = 2 (Diffusion-DPO)", "euler", {"group-size": 2}),
}
FLOW_BUDGET = 2.0  # Flow-GRPO runs to twice GDRO's whole cost: the table's second point
FLOW_POINTS = (0.25, 0.5, 1.0, 1.5, 2.0)  # its checkpoints scored: at these multiples of GDRO's whole cost
# Sized for 2 CPU cores (one thread per seed; measured on the run in docs/experiments.md: the Euler cache 5 s per
# string of 16 images, GDRO 1.9 s a step, Flow-GRPO 26 s a step, eval.py 2.8 images/s): both seeds side by side
# 87 minutes, the held-out eval 21 of them. Scaled down from the --ocr experiment: 80 training strings (not 200),
# 200 GDRO steps (not 300), a checkpoint every 50, 40 held-out strings x 4 images (not 100 x 8).
SCALE = dict(gdro_steps=200, save_every=50, train_prompts=80, heldout_strings=40, heldout_images=4, val_strings=100,
             val_images=6)
# what --scale accepts: counts of at least 1, and 2 held-out strings for a paired standard error; check_inputs also
# holds the string counts to the model's splits
SCALE_RULES = {**{key: experiments.AT_LEAST_1 for key in SCALE}, "heldout_strings": experiments.AT_LEAST_2}
MODEL_DIR = "runs/text_binding"  # built there when it holds no model; another --model-dir must hold one
BUILD_MODEL = "python -m experiments.text_model --recipe binding"
POLL_S = 0.5  # how often a run's CPU time is read: a checkpoint's is counted late by at most this
COMPUTE = ("cpu_seconds: CPU seconds of the method's processes from their start, one thread each (offline: the "
           "cache's process, then the training process to the checkpoint; Flow-GRPO: its process to the checkpoint); "
           "images: images sampled")  # said in results.json: runs before it counted wall seconds


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


def train_methods(model_dir, prompts, out, seed, scale, log):
    """Every method's run for one seed in out/METHOD (caches in out/cache_*); {method: [points]} where a point is
    {step, cpu_seconds, images, lora}: the checkpoints to score, with their compute."""
    settings = {**run.OCR_GDRO, "lr": LR, "max-steps": scale["gdro_steps"], "save-every": scale["save_every"],
                "log-every": scale["save_every"]}
    cache_cpu, points = {}, {}
    for name, cache in CACHES.items():  # the cache alone (no training): what drawing and scoring it costs
        folder = out / f"cache_{name}"
        if not (folder / "clock.json").is_file():
            write_clock(folder, clocked(run.gdro_command(model_dir, prompts, folder, seed,
                                                         {**settings, **cache, "max-steps": 0}), log))
        cache_cpu[name] = read_clock(folder)["cpu_seconds"]
    images = len(prompts.read_text().splitlines()) * settings["images-per-prompt"]
    for method, (_, cache, change) in METHODS.items():
        folder = out / method
        if cache is None:
            continue
        if not (folder / "lora").is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(out / f"cache_{cache}" / "cache", folder / "cache")
            cmd = run.gdro_command(model_dir, prompts, folder, seed, {**settings, **CACHES[cache], **change})
            write_clock(folder, clocked(cmd, log, folder / "checkpoints"))
        points[method] = offline_points(folder, cache_cpu[cache], images)
    gdro_cost = points["gdro"][-1]["cpu_seconds"]  # this seed's whole GDRO run: cache and training
    folder = out / "flow_grpo"
    if not (folder / "done").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        clock = clocked([sys.executable, "-m", "experiments.flow_grpo", "--model", model_dir, "--prompts", prompts,
                         "--out", folder, "--seed", seed, "--max-cpu-seconds", round(FLOW_BUDGET * gdro_cost),
                         "--save-every", 1, "--max-steps", 10**6, "--set", f"lr={LR}",
                         f"guidance={settings['guidance']}"], log, folder / "checkpoints")
        write_clock(folder, clock)
        (folder / "done").write_text("")
    points["flow_grpo"] = flow_points(folder, gdro_cost)
    return points


def offline_points(folder, cache_cpu, images):
    """An offline method's checkpoints with their compute: the cache's process, then the training process's CPU
    seconds when each checkpoint was written (the second process loads the model again: a little against them)."""
    point = lambda step, cpu, lora: {"step": step, "cpu_seconds": round(cpu, 1), "images": images, "lora": lora}
    return [point(0, cache_cpu, None)] + [point(step, cache_cpu + cpu, str(folder / "checkpoints" / f"step_{step:06d}"))
                                          for step, cpu in read_clock(folder)["steps"].items()]  # 0: still the base


def flow_points(folder, gdro_cost):
    """Flow-GRPO's checkpoints nearest to FLOW_POINTS x gdro_cost CPU seconds (the latest at or below each), with the
    images it had sampled by then."""
    images = {m["step"]: m["images_sampled"] for m in map(json.loads, (folder / "metrics.jsonl").open())}
    steps, chosen = list(read_clock(folder)["steps"].items()), []
    for f in FLOW_POINTS:
        within = [(step, cpu) for step, cpu in steps if cpu <= f * gdro_cost] or steps[:1]
        if within[-1] not in chosen:
            chosen.append(within[-1])
    return [{"step": 0, "cpu_seconds": 0.0, "images": 0, "lora": None}] + [
        {"step": step, "cpu_seconds": cpu, "images": images[step],
         "lora": str(folder / "checkpoints" / f"step_{step:06d}")} for step, cpu in chosen]


def base_on_val(model_dir, out, scale, log):
    """The base model's failure on the val strings (scale['val_images'] images each) and how often a group of its
    images has a tied best reward: what GDRO's ranking can use that copying the best image cannot."""
    from reward_ocr import OcrReward, ocr_target
    folder = out / "val_base"
    if not (folder / "scores.jsonl").is_file():
        cmd = run.eval_command(model_dir, Path(model_dir) / "val.txt", [], folder, run.OCR_GDRO["guidance"],
                               scale["val_images"])
        clocked(cmd + ["--max-prompts", scale["val_strings"]], log)
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


def score_points(model_dir, points, out, scale, log):
    """One eval.py on the held-out strings for every point of every method (base images once); each point gets its
    held-out reward and the paired gain over the base with its standard error (a point with no LoRA: the base)."""
    flat = [p for method in METHODS for p in points[method] if p["lora"]]
    folder = out / "eval_heldout"
    if not (folder / "scores.jsonl").is_file():
        cmd = run.eval_command(model_dir, Path(model_dir) / "test.txt", [p["lora"] for p in flat], folder,
                               run.OCR_GDRO["guidance"], scale["heldout_images"])
        clocked(cmd + ["--max-prompts", scale["heldout_strings"]], log)
    for i, p in enumerate(flat):
        g = run.paired_gain(folder / "scores.jsonl", f"lora{i + 1}" if len(flat) > 1 else "lora")
        p.update(heldout=round(g["gdro_ocr"], 4), base=round(g["base_ocr"], 4), gain=round(g["gain"], 4),
                 gain_se=round(g["gain_se"], 4))
    for p in (p for method in METHODS for p in points[method] if not p["lora"]):
        p.update(heldout=flat[0]["base"], base=flat[0]["base"], gain=0.0, gain_se=0.0)
    return points


def at_compute(points, cpu_seconds):
    """The latest point of a run within `cpu_seconds` of compute, or None."""
    within = [p for p in points if p["cpu_seconds"] <= cpu_seconds * 1.02]  # 2 %: a hair past GDRO's own end
    return within[-1] if within else None


def table(results):
    """Markdown: each method's paired held-out gain at GDRO's whole cost and at twice it, per seed."""
    lines = ["| method | at GDRO's whole cost: gain +- se (seed " + " / ".join(map(str, results["seeds"])) + ") "
             "| its compute (CPU s, images) | at twice it: gain +- se | its compute (CPU s, images) |",
             "|" + " --- |" * 5]
    for method, (label, _, _) in METHODS.items():
        cells = []
        for factor in (1, 2):
            found = [at_compute(runs[method], factor * runs["gdro"][-1]["cpu_seconds"])
                     for runs in (results["runs"][str(s)] for s in results["seeds"])]
            cells.append(" / ".join("-" if p is None else f"{p['gain']:+.3f} +- {p['gain_se']:.3f}" for p in found))
            cells.append(" / ".join("-" if p is None else f"{p['cpu_seconds']:.0f}, {p['images']}" for p in found))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(results, path):
    """Held-out gain over the base against compute (CPU seconds), a line per method: the mean over seeds of each
    checkpoint's paired gain, with bars of +-1 standard error (the seeds' se combined)."""
    import matplotlib
    matplotlib.use("Agg")  # a file, never a window: the comparison runs on machines without a display
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.6, 4.6), dpi=100)
    ax.axhline(0, color="0.75", linewidth=1, label="the base")
    for method, (label, _, _) in METHODS.items():
        runs = [results["runs"][str(s)][method] for s in results["seeds"]]
        n = min(len(r) for r in runs)
        seconds = [np.mean([r[i]["cpu_seconds"] for r in runs]) for i in range(n)]
        gain = [np.mean([r[i]["gain"] for r in runs]) for i in range(n)]
        se = [np.sqrt(sum(r[i]["gain_se"] ** 2 for r in runs)) / len(runs) for i in range(n)]
        ax.errorbar(seconds, gain, yerr=se, marker="o", markersize=4, capsize=2, linewidth=1.5, label=label)
    ax.set_xlabel("compute: CPU seconds of the whole run (loading, rollouts, scoring, training)")
    ax.set_ylabel("held-out OCR gain over the base")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def split_sizes(model_dir):
    """{split: strings} of the text model in model_dir, or of the binding recipe's, which main builds there."""
    if (Path(model_dir) / "text_model.json").is_file():
        return {name: len(Path(model_dir, f"{name}.txt").read_text().splitlines()) for name in ("train", "val", "test")}
    r = text_model.BINDING_RECIPE
    return {name: len(strings) for name, strings in text_model.text_strings(r["seed"], r["length"]).items()}


def check_inputs(args):
    """Every flag, before the model is built or any run starts: {scale}, the plot's path."""
    experiments.check_out(args.out)
    plot = Path(args.plot or Path(args.out) / "compare.png")
    experiments.check_out(plot.parent, "--plot")
    experiments.check(("--plot", plot, (lambda x: x.suffix.lower() in (".png", ".svg", ".pdf") and not x.is_dir(),
                                        "a .png, .svg or .pdf file")))
    if args.plot_only:
        if not (Path(args.out) / "results.json").is_file():
            raise gdro.BadInput(f"--plot-only: {Path(args.out) / 'results.json'} not found; run the comparison first "
                                "(or give the --out it wrote)")
        return None, plot
    if not Path("/proc/self/stat").is_file():
        raise gdro.BadInput("the comparison reads each run's CPU seconds from /proc: it runs on Linux")
    experiments.check(*[("--seeds", seed, experiments.AT_LEAST_0) for seed in args.seeds],
                      ("--seeds", args.seeds, (lambda x: len(set(x)) == len(x), "distinct")))
    experiments.check_model_dir(args.model_dir, MODEL_DIR, BUILD_MODEL)
    scale = {**SCALE, **experiments.key_values("--scale", args.scale, SCALE, SCALE_RULES)}
    sizes = split_sizes(args.model_dir)
    experiments.check(*[(f"--scale {key}=", scale[key], experiments.at_most(sizes[split], f"the {split} strings"))
                        for key, split in (("train_prompts", "train"), ("val_strings", "val"),
                                           ("heldout_strings", "test"))])
    return scale, plot


def main(argv=None):
    p = experiments.Parser(description="GDRO vs Flow-GRPO, beta = 0 and k = 2 at equal compute (CPU text model).")
    p.add_argument("--out", default="runs/compare", help="run folder (default: %(default)s)")
    p.add_argument("--model-dir", default=MODEL_DIR,
                   help="a text model's folder; the default is built there if it holds none (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run of every method per seed")
    p.add_argument("--scale", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change a SCALE value, e.g. gdro_steps=100")
    p.add_argument("--plot", help="the figure (default: OUT/compare.png)")
    p.add_argument("--plot-only", action="store_true", help="redraw the figure and table from OUT/results.json")
    args = p.parse_args(argv)
    scale, plot = check_inputs(args)
    out = Path(args.out)
    if args.plot_only:
        results = json.loads((out / "results.json").read_text())
        plot_results(results, plot)
        return print(table(results))
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)
    if not (model_dir / "text_model.json").is_file():
        text_model.build_text_model(model_dir, text_model.BINDING_RECIPE)
    build_s = json.loads((model_dir / "text_model.json").read_text()).get("build_seconds")
    prompts, _, _ = run.ocr_prompt_files(out, model_dir, scale["train_prompts"])
    val_base = base_on_val(model_dir, out, scale, out / "val_base.log")  # said before any method runs
    print("base model on val: " + json.dumps(val_base), flush=True)

    def one_seed(seed):
        folder, log = out / f"seed{seed}", out / f"seed{seed}.log"
        folder.mkdir(exist_ok=True)
        return score_points(model_dir, train_methods(model_dir, prompts, folder, seed, scale, log), folder, scale, log)

    with ThreadPoolExecutor(len(args.seeds)) as pool:
        runs = dict(zip(map(str, args.seeds), pool.map(one_seed, args.seeds)))
    results = {"model_dir": str(model_dir), "build_seconds": build_s, "scale": scale, "lr": LR, "compute": COMPUTE,
               "flow_grpo": {**FLOW_GRPO, "lr": LR}, "seeds": args.seeds, "val_base": val_base, "runs": runs,
               "seconds": round(time.time() - t0)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_results(results, plot)
    (out / "table.md").write_text(table(results) + "\n")
    print(table(results))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    gdro.cli(main)
