"""GDRO with GenEval's reward on the scene model (experiments/scene_model.py), the paper's GenEval setting, end to end
through the real commands: gdro.py --model DIR --reward experiments/scene_detector.py:scene_reward on the model's
training prompts (each cached with 16 images), eval.py on the val prompts for every checkpoint (the step chosen
there by GenEval score), then eval.py on the held-out test prompts from held-out seeds, base and the chosen LoRA from
the same seeds. Every image eval.py saves is scored again here by GenEval's rules on the scene detector, for the
per-tag figures: the paired gains per prompt, per tag and overall, with standard errors. Then the ablations (beta 4,
beta 0, k = 2) on each seed's cache, each at its last step, scored beside the base on the held-out prompts.

    python -m experiments.scene_gdro                  # the model (once), two seeds side by side: JSON on the last line
    python -m experiments.scene_gdro --ablations      # only the ablations, on an earlier run's caches

A rerun continues: gdro.py resumes its checkpoints and an evaluation that wrote its report is not run again.
Results: OUT/results.json (every figure, also the last line printed), OUT/ablations.json and .md, OUT/grid.png.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import experiments
import gdro
import reward_geneval
import eval as evaluate
from experiments import scene_model
from experiments.run import ablation_chains, flags, run_chains
from experiments.scene_detector import scene_evaluate

MODEL_DIR = "runs/scene_model"  # built there when it holds no model
REWARD = "experiments/scene_detector.py:scene_reward"
# The paper's GenEval setting: beta 6, gamma 1.0, k = 6 of 16 cached; tau 0.05 and LoRA rank 32 as its OCR setting;
# 10 Euler steps at CFG 4.5 for rollouts and evaluation; lr 3e-3 and a checkpoint every 25 steps, as the text model's
# experiment found on its val split (docs/experiments.md); 300 steps of 8 groups
GDRO = {"images-per-prompt": 16, "group-size": 6, "beta": 6.0, "tau": 0.05, "gamma": 1.0, "steps": 10,
        "guidance": 4.5, "groups-per-step": 8, "max-steps": 300, "lr": 3e-3, "lora-rank": 32, "log-every": 25,
        "save-every": 25}
ABLATIONS = [  # (row label, changes to GDRO); each trains on its seed's cache of the main run, taken at its last step
    ("GDRO (k = 6, beta = 6, gamma = 1.0), last step", {}),
    ("beta = 4 (the paper sees it collapse)", {"beta": 4.0}),
    ("beta = 0 (flow matching on each group's best image)", {"beta": 0.0}),
    ("k = 2 (Diffusion-DPO's pairs)", {"group-size": 2}),
]


def gdro_command(model_dir, prompts, out, seed, settings):
    """gdro.py's command line; with --resume where an earlier run left a checkpoint (a rerun continues it)."""
    resume = ["--resume"] if gdro.checkpoints(Path(out) / "checkpoints") else []
    return [sys.executable, "gdro.py", "--model", str(model_dir), "--reward", REWARD, "--prompts", str(prompts),
            "--out", str(out), "--seed", str(seed), *flags(settings), *resume]


def eval_command(model_dir, prompts, loras, out, settings, images, checkpoints=None):
    """eval.py's command line: base vs each LoRA folder in loras, or vs every checkpoint in checkpoints; None where
    out holds its report already (a rerun does not evaluate again)."""
    if (Path(out) / "report.json").is_file():
        return None
    sets = ["--checkpoints", str(checkpoints)] if checkpoints else ["--lora", *map(str, loras)]
    return [sys.executable, "eval.py", "--model", str(model_dir), "--prompts", str(prompts), "--judge", "none",
            "--reward", REWARD, *sets, "--out", str(out), "--guidance", str(settings["guidance"]),
            "--steps", str(settings["steps"]), "--images-per-prompt", str(images), "--batch", "16"]


def verdicts(eval_dir):
    """{set: {prompt index: [explain's verdict of each image, in seed order]}} of eval.py's saved images, scored
    again here."""
    found = {}
    rows = [json.loads(line) for line in (Path(eval_dir) / "scores.jsonl").read_text().splitlines()]
    for row in sorted(rows, key=lambda r: (r["set"], r["prompt_index"], r["seed"])):
        with Image.open(Path(eval_dir) / row["image"]) as img:
            verdict = scene_evaluate([img.convert("RGB")], [row["prompt"]])[0]
        found.setdefault(row["set"], {}).setdefault(row["prompt_index"], []).append(verdict)
    return found


def figures(per_prompt):
    """A set's GenEval score (the tags' mean of the share correct), per-tag accuracy, mean reward, and how many
    objects its images hold (kept detections: GenEval accepts extra objects except in counting)."""
    tags = {t: [v for vs in per_prompt.values() for v in vs if v["tag"] == t] for t in reward_geneval.TAGS}
    accuracy = {t: float(np.mean([v["correct"] for v in vs])) for t, vs in tags.items() if vs}
    found = [len(v["detections"]) for vs in per_prompt.values() for v in vs]
    return {"geneval_score": float(np.mean(list(accuracy.values()))), "tag_accuracy": accuracy,
            "reward": float(np.mean([v["reward"] for vs in per_prompt.values() for v in vs])),
            "objects_per_image": float(np.mean(found)), "images_with_3_or_more": float(np.mean(np.array(found) >= 3))}


def paired_gain(found, name):
    """Base vs set `name` on the same prompts and seeds: each set's figures, and the paired gains with standard errors
    over prompts (a prompt's difference: the mean over its images). The GenEval score's gain is the tags' mean of
    their gains; its se takes the tags as independent, each with the pooled within-tag variance of the prompts'
    differences (with 4 classes, single_object has 1 test scene: no spread of its own)."""
    base, lora = found["base"], found[name]
    result = {"base": figures(base), name: figures(lora), "tags": {}}
    diffs = {}
    for tag in reward_geneval.TAGS:
        prompts = [i for i in base if base[i][0]["tag"] == tag]
        diffs[tag] = np.array([np.mean([v["correct"] for v in lora[i]]) - np.mean([v["correct"] for v in base[i]])
                               for i in prompts])
    diffs = {t: d for t, d in diffs.items() if len(d)}
    pooled = sum(((d - d.mean()) ** 2).sum() for d in diffs.values()) / max(1, sum(map(len, diffs.values()))
                                                                            - len(diffs))
    for tag, d in diffs.items():
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.sqrt(pooled)
        result["tags"][tag] = {"gain": float(d.mean()), "se": float(se), "prompts": len(d)}
    result["geneval_gain"] = float(np.mean([d.mean() for d in diffs.values()]))
    result["geneval_gain_se"] = float(np.sqrt(pooled * sum(1 / len(d) for d in diffs.values())) / len(diffs))
    d = np.array([np.mean([v["reward"] for v in lora[i]]) - np.mean([v["reward"] for v in base[i]]) for i in base])
    result["reward_gain"], result["reward_gain_se"] = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    result["prompts_improved"], result["prompts_worse"] = float((d > 0).mean()), float((d < 0).mean())
    return result


def best_on_val(run_dir):
    """The checkpoint of run_dir with the highest GenEval score on val (the earliest of equals), and every one's."""
    found = verdicts(run_dir / "eval_val")
    curve = {name: figures(found[name])["geneval_score"] for name in sorted(found) if name != "base"}
    best = max(curve, key=curve.get)  # max keeps the first of equals: the earliest step
    return {"step": int(best.removeprefix("step_")), "checkpoint": str(run_dir / "checkpoints" / best),
            "val_base": round(figures(found["base"])["geneval_score"], 4),
            "val_curve": {int(n.removeprefix("step_")): round(s, 4) for n, s in curve.items()}}


def prompt_files(out, model_dir, max_prompts):
    """OUT/train_prompts.txt: the model's training prompts (the first max_prompts); val and test: the model's."""
    train = Path(model_dir, "train.txt").read_text().splitlines()[:max_prompts]
    (out / "train_prompts.txt").write_text("\n".join(train) + "\n")
    return out / "train_prompts.txt", Path(model_dir) / "val.txt", Path(model_dir) / "test.txt"


def todo(chains):
    """The chains without their steps already done (eval_command's None)."""
    return [[cmd for cmd in chain if cmd] for chain in chains]


def measured(out, model_dir):
    """The detector's accuracy on the model's VAE renders and the base on val (scene_model's measurements), made
    once into OUT."""
    found = {}
    for name, flag in (("detector_accuracy", "--detector-accuracy"), ("base_on_val", "--base-on-val")):
        if not (out / f"{name}.json").is_file():
            scene_model.main(["--out", str(model_dir), flag, "--json", str(out / f"{name}.json")])
        found[name] = json.loads((out / f"{name}.json").read_text())
    return found


def draw_grid(path, eval_dir, found, prompts_file, images, step):
    """eval.py's grid of the held-out images in eval_dir (base | chosen LoRA, the first image of the first 8 prompts),
    with their verdicts `found` (verdicts'): the scene detector's kept detections, the check that failed."""
    scored = {name: [v for i in sorted(found[name]) for v in found[name][i]] for name in ("base", "lora")}
    prompts = Path(prompts_file).read_text().splitlines()
    evaluate.draw_grid(path, Path(eval_dir) / "images", {"base": "base", "lora": f"GDRO, step {step}"}, scored,
                       prompts, images)
    with Image.open(path) as grid:  # 256 colours, not dithered (a pixel off by 1.7 of 255 on average): 350 -> 70 KB
        grid.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path)


def experiment(args, settings):
    """Per seed gdro.py, the step chosen on val, the chosen checkpoint against the base on the test prompts; then
    the ablations. Every figure in OUT/results.json and on the last line printed."""
    t0, out, model_dir = time.time(), Path(args.out), Path(args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "scene_model.json").is_file():
        scene_model.build_scene_model(model_dir)
    before = measured(out, model_dir)
    train, val, test = prompt_files(out, model_dir, args.max_prompts)
    dirs, logs = {s: out / f"seed{s}" for s in args.seeds}, [out / f"seed{s}.log" for s in args.seeds]
    run_chains(todo([[gdro_command(model_dir, train, d, s, settings),
                      eval_command(model_dir, val, [], d / "eval_val", settings, args.val_images,
                                   checkpoints=d / "checkpoints")] for s, d in dirs.items()]), logs)
    chosen = {s: best_on_val(d) for s, d in dirs.items()}
    run_chains(todo([[eval_command(model_dir, test, [chosen[s]["checkpoint"]], d / "eval_test", settings,
                                   args.test_images)] for s, d in dirs.items()]), logs)
    found = {s: verdicts(d / "eval_test") for s, d in dirs.items()}  # every held-out image scored once, here
    runs = [{"seed": s, **chosen[s], "training": training_time(d), **paired_gain(found[s], "lora")}
            for s, d in dirs.items()]
    first = args.seeds[0]
    draw_grid(out / "grid.png", dirs[first] / "eval_test", found[first], test, args.test_images, chosen[first]["step"])
    result = {"model_dir": str(model_dir), "train_prompts": str(train), "val_prompts": str(val),
              "heldout_prompts": str(test), "settings": settings, "val_images": args.val_images,
              "test_images": args.test_images, **before, "seconds": round(time.time() - t0), "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    for r in runs:
        print(f"seed {r['seed']}: step {r['step']} (best on val); held-out GenEval score "
              f"{r['base']['geneval_score']:.4f} -> {r['lora']['geneval_score']:.4f} ({r['geneval_gain']:+.4f} +- "
              f"{r['geneval_gain_se']:.4f}), reward {r['reward_gain']:+.4f} +- {r['reward_gain_se']:.4f}")
    t1 = time.time()
    result["ablations"] = ablations(args)
    result["ablation_seconds"] = round(time.time() - t1)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


def training_time(run_dir):
    """gdro.py's training time of a run (its metrics' last time_s) and its rate, steps a second."""
    last = json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    return {"seconds": last["time_s"], "steps": last["step"], "steps_per_s": round(last["step"] / last["time_s"], 3)}


def seeds(res, name, key):
    """A table cell: set `name`'s figure `key`, seed by seed."""
    return " / ".join(f"{r[name][key]:.3f}" for r in res)


def gains(res, key):
    return " / ".join(f"{r[key]:+.3f} +- {r[key + '_se']:.3f}" for r in res)


def ablations(args):
    """ABLATIONS on each seed's cache of the main run (run it first), each at its last step, scored beside the base
    on the held-out prompts by one eval.py per seed. A markdown table."""
    out = Path(args.out)
    main_run = json.loads((out / "results.json").read_text())
    model_dir, settings = main_run["model_dir"], main_run["settings"]
    chains = ablation_chains(out, args.seeds, [change for _, change in ABLATIONS], lambda folder, s, change:
                             gdro_command(model_dir, main_run["train_prompts"], folder, s, {**settings, **change}),
                             lambda loras, eval_dir: eval_command(model_dir, main_run["heldout_prompts"], loras,
                                                                  eval_dir, settings, args.ablation_images))
    run_chains(todo(chains), [out / f"ablations_seed{s}.log" for s in args.seeds])
    found = {s: verdicts(out / "ablations" / f"eval_seed{s}") for s in args.seeds}
    rows = {label: [paired_gain(found[s], f"lora{i + 1}") for s in args.seeds] for i, (label, _) in
            enumerate(ABLATIONS)}
    table = ["| setting | held-out GenEval score | gain +- se | mean reward | gain +- se |", "|" + " --- |" * 5]
    first = rows[ABLATIONS[0][0]]
    table.append(f"| base model | {seeds(first, 'base', 'geneval_score')} | | {seeds(first, 'base', 'reward')} | |")
    for i, (label, res) in enumerate(rows.items()):
        name = f"lora{i + 1}"
        table.append(f"| {label} | {seeds(res, name, 'geneval_score')} | {gains(res, 'geneval_gain')} "
                     f"| {seeds(res, name, 'reward')} | {gains(res, 'reward_gain')} |")
    (out / "ablations.json").write_text(json.dumps(rows, indent=2))
    (out / "ablations.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return rows


def main(argv=None):
    p = experiments.Parser(description="GDRO with GenEval's reward on the scene model pretrained here on the CPU.")
    p.add_argument("--out", default="runs/scene_gdro", help="run folder (default: %(default)s)")
    p.add_argument("--model-dir", default=MODEL_DIR, help="a scene model's folder (default %(default)s, built once)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one GDRO run per seed, side by side")
    p.add_argument("--max-prompts", type=int, default=None, help="train on the first N training prompts (default all)")
    p.add_argument("--val-images", type=int, default=4, help="images per val prompt for each checkpoint")
    p.add_argument("--test-images", type=int, default=32, help="images per held-out prompt, base and LoRA")
    p.add_argument("--ablation-images", type=int, default=16, help="images per held-out prompt in the ablations")
    p.add_argument("--ablations", action="store_true", help="only beta 4, beta 0, k = 2 on an earlier run's caches")
    p.add_argument("--set", nargs="*", default=[], metavar="FLAG=VALUE", help="change a GDRO flag, e.g. max-steps=50")
    args = p.parse_args(argv)
    experiments.check_out(args.out)
    experiments.check(*[("--seeds", s, experiments.AT_LEAST_0) for s in args.seeds],
                      ("--seeds", args.seeds, (lambda x: len(set(x)) == len(x), "distinct")),
                      ("--max-prompts", args.max_prompts or 1, experiments.AT_LEAST_1),
                      *[(f, v, experiments.AT_LEAST_1) for f, v in (("--val-images", args.val_images),
                        ("--test-images", args.test_images), ("--ablation-images", args.ablation_images))])
    if not (Path(args.model_dir) / "scene_model.json").is_file() and Path(args.model_dir) != Path(MODEL_DIR):
        raise gdro.BadInput(f"--model-dir {args.model_dir} holds no scene model (no scene_model.json); build it with "
                            f"python -m experiments.scene_model --out {args.model_dir}")
    if args.ablations:
        if not (Path(args.out) / "results.json").is_file():
            raise gdro.BadInput(f"--ablations: {Path(args.out) / 'results.json'} not found; they train on the main "
                                f"run's caches: run python -m experiments.scene_gdro --out {args.out} first")
        rows = ablations(args)
        print(json.dumps(rows))
        return rows
    return experiment(args, {**GDRO, **experiments.key_values("--set", args.set, GDRO, {})})


if __name__ == "__main__":
    gdro.cli(main)
