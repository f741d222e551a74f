"""Does GDRO learn? Two CPU experiments, each with the paper's ablations.

--ocr: GDRO with the OCR reward on a small text-rendering model pretrained here on the CPU
(experiments/text_model.py: 3-digit strings, 64 px, SD3's classes). The real commands end to end: gdro.py
--model DIR --reward ocr on training strings, eval.py --model DIR on held-out strings and seeds, base vs GDRO.

    python -m experiments.run --ocr               # the text model (once), two seeds: JSON on the last line
    python -m experiments.run --ocr --ablations   # k = 2, gamma = 0, tau = 0 / 0.5, beta = 6 / 0 on the same caches

The colour toy (no flag): the tiny random SD3 model draws noise that OCR cannot read, so the prompt names a colour
(red, green or blue) and experiments/toy_reward.py scores how much that colour dominates the image. The run is the
real one, through gdro.main and the --reward hook. Then the base and the trained model draw FRESH images from seeds
never used in the cache, for held-out prompts (the same colours in sentences never trained on) and for the training
prompts. The three colour rewards of one image sum to zero, so no prompt-independent change can raise all three:
improving every colour means the LoRA reads the colour word in the prompt.

    python -m experiments.run               # main experiment, prints the measures (about 2 minutes on 2 CPU cores)
    python -m experiments.run --ablations   # the paper's ablations on this toy, two seeds: a markdown table

Results go to OUT/results.json (main) and OUT/ablations.json + OUT/ablations.md (docs/experiments.md).
"""
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import experiments
import gdro
from experiments import text_model, toy_reward

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # gdro.py's and eval.py's folder: the commands run there
COLOURS = ("red", "green", "blue")
# Short prompts, colour word first: the tiny text encoders are random and read characters, and only in short prompts
# does the colour word dominate the embedding (in long sentences prompts did not cluster by colour; see README).
TRAIN_TEMPLATES = ("{} image", "{} sky", "{} wall", "{} car")
HELD_OUT_TEMPLATES = ("{} photo", "{} scene", "{} cat")  # never trained on
EVAL_SEED = 1_000_000  # held-out seeds start here; the cache's rollouts use seed + i * n + j, far below
# The toy's gdro flags, all passed explicitly (so --tiny's TINY_RUN shrinking never applies). Kept from the paper:
# k = 6, beta = 12, tau = 0.05, gamma = 0.5, the loss and the loop. Changed for a random tiny model on a CPU:
# 32 px, 4 sampler steps, 32 images per prompt, 12 groups per step, 200 steps, lr 1e-2, LoRA rank 4 (see README).
TOY = {"resolution": 32, "images-per-prompt": 32, "steps": 4, "group-size": 6, "groups-per-step": 12, "micro-batch": 12,
       "max-steps": 200, "lr": 1e-2, "lora-rank": 4, "beta": 12.0, "tau": 0.05, "gamma": 0.5,
       "normalize-rewards": False, "seed": 0}
ABLATIONS = [  # (row label, changes to TOY)
    ("GDRO, toy defaults (k=6, beta=12, tau=0.05, gamma=0.5)", {}),
    ("group size k = 2", {"group-size": 2}),
    ("group size k = 2, 36 groups per step (as many images as k = 6)", {"group-size": 2, "groups-per-step": 36}),
    ("gamma = 0 (no top-1 stabiliser)", {"gamma": 0.0}),
    ("tau = 0 (hard ranking, Eq. 12)", {"tau": 0.0}),
    ("tau = 0.5 (softer target)", {"tau": 0.5}),
    ("beta = 30", {"beta": 30.0}),
    ("beta = 0 (top-1 flow matching only, no ranking)", {"beta": 0.0}),
    ("beta = 0, gamma = 0 (a loss that does nothing)", {"beta": 0.0, "gamma": 0.0}),
    ("no training (--max-steps 0)", {"max-steps": 0}),
]


def prompts(templates):
    return [t.format(c) for t in templates for c in COLOURS]


def flags(settings):
    """{flag: value} -> command-line words: True is the bare flag, False leaves it out."""
    return [x for k, v in settings.items() if v is not False
            for x in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]


def gdro_argv(settings, prompt_file, out):
    return ["--tiny", "--prompts", str(prompt_file), "--reward", f"{HERE / 'toy_reward.py'}:colour_reward",
            "--out", str(out), "--max-prompts", str(len(prompts(TRAIN_TEMPLATES))), "--rollout-batch", "16",
            "--log-every", "25", "--save-every", "100000", *flags(settings)]


def train(out, settings, cache_from=None):
    """One gdro.main run in OUT; reuses the rollout cache of CACHE_FROM (same base samples) when given."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "prompts.txt").write_text("\n".join(prompts(TRAIN_TEMPLATES)) + "\n")
    if cache_from is not None:
        shutil.copytree(Path(cache_from) / "cache", out / "cache")
    t0 = time.time()
    lora = gdro.main(gdro_argv(settings, out / "prompts.txt", out))
    return lora, time.time() - t0


def fresh_samples(pipe, prompt_list, n_seeds, settings):
    """Latents [P, S, ...], rewards [P, S] and conditioning of fresh images from the held-out seeds."""
    seeds = list(range(EVAL_SEED, EVAL_SEED + n_seeds))
    res, latents, rewards, conds, sd3 = settings["resolution"], [], [], [], gdro.family_record("sd3")
    for p in prompt_list:
        cond, uncond = gdro.encode_prompt(pipe, sd3, p)
        x0 = gdro.generate(pipe, sd3, cond, uncond, seeds, settings["steps"], gdro.SD3.guidance, res)
        latents.append(x0)
        rewards.append(toy_reward.colour_reward(gdro.decode(pipe, sd3, x0), [p] * n_seeds))
        conds.append(cond)
    return torch.stack(latents), np.array(rewards), conds


def effect(base, trained):
    """Effect size (mean reward gain over the base's seed-to-seed standard deviation, pooled over prompts)
    and the share of prompts whose mean reward over the held-out seeds went up."""
    sd = (base - base.mean(1, keepdims=True)).std()
    gain = (trained.mean(1) - base.mean(1)) / sd
    return {"effect_size": float(gain.mean()), "improved": float((gain > 0).mean()),
            "base_mean": float(base.mean()), "trained_mean": float(trained.mean()), "base_sd": float(sd),
            "per_prompt_effect": [round(float(g), 3) for g in gain]}


@torch.no_grad()
def rank_accuracy(pipe, latents, rewards, conds, k=6, draws=4, seed=0):
    """The implicit reward s = -(err_policy - err_ref) of Eq. 5 on held-out groups of k base images (fresh seeds,
    held-out prompts), from gdro.velocity_errors as in training: how often it puts the best image first (top-1, chance
    1/k; groups whose best reward is tied are left out), and how often it orders a pair like the explicit reward
    (pairwise, chance 1/2; pairs of equal reward left out). `draws` (t, eps) per group, as in training."""
    gen, config, top1, pairs = torch.Generator().manual_seed(seed), dict(pipe.scheduler.config), [], []
    for x_all, r_all, cond in zip(latents, rewards, conds):
        for g in range(len(r_all) // k):
            x0, r = x_all[None, g * k:(g + 1) * k], torch.tensor(r_all[g * k:(g + 1) * k])
            for _ in range(draws):
                eps = torch.randn((1, *x0.shape[2:]), generator=gen)
                t = gdro.sample_t(1, gdro.schedule_mu(gdro.family_record("sd3"), config, x0.shape[2:], None), gen)
                err_policy, err_ref = gdro.velocity_errors(gdro.SD3().velocity, pipe.transformer, x0, cond, t, eps)
                s = -(err_policy - err_ref)[0]
                if (r == r.max()).sum() == 1:  # tied implicit rewards (an untrained LoRA: all 0) count as a share
                    top1.append((r[s == s.max()] == r.max()).float().mean().item())
                i, j = torch.triu_indices(k, k, 1)
                untied = r[i] != r[j]
                pairs += ((torch.sign(s[i] - s[j]) * torch.sign(r[i] - r[j]) + 1) / 2)[untied].tolist()  # tie in s: 1/2
    return {"top1": float(np.mean(top1)), "pairwise": float(np.mean(pairs)), "groups": len(top1) // draws}


def evaluate(lora, base, settings, n_seeds):
    """Fresh images of the trained model on the held-out seeds; base = fresh_samples of the base model."""
    print("fresh images of the trained model on the held-out seeds ...", flush=True)
    pipe, _ = gdro.load_pipeline(None, tiny=True)
    pipe.load_lora_weights(str(lora))
    out = {}
    for split, prompt_list in (("held_out_prompts", prompts(HELD_OUT_TEMPLATES)),
                               ("train_prompts", prompts(TRAIN_TEMPLATES))):
        _, trained, _ = fresh_samples(pipe, prompt_list, n_seeds, settings)
        out[split] = effect(base[split][1], trained)
    out["rank_acc_held_out"] = rank_accuracy(pipe, *base["held_out_prompts"], seed=settings["seed"])
    return out


def base_samples(settings, n_seeds):
    print("fresh images of the base model on the held-out seeds ...", flush=True)
    pipe, _ = gdro.load_pipeline(None, tiny=True)
    return {split: fresh_samples(pipe, prompts(t), n_seeds, settings)
            for split, t in (("held_out_prompts", HELD_OUT_TEMPLATES), ("train_prompts", TRAIN_TEMPLATES))}


def run(out, settings, n_seeds, base=None, cache_from=None):
    """Train with SETTINGS in OUT and measure it on the held-out seeds; returns the results dict."""
    base = base_samples(settings, n_seeds) if base is None else base
    lora, train_s = train(out, settings, cache_from)
    results = {"settings": settings, "train_s": round(train_s, 1), **evaluate(lora, base, settings, n_seeds)}
    metrics = Path(out) / "metrics.jsonl"  # gdro's log; none with --max-steps 0
    log = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if log:  # gdro's own rank_acc on training groups (top-1 of k, chance 1/k), last half of training
        results["rank_acc_train_log"] = float(np.mean([m["rank_acc"] for m in log[len(log) // 2:]]))
    return results


def show(results):
    for split in ("held_out_prompts", "train_prompts"):
        r = results[split]
        print(f"{split:>16}: reward {r['base_mean']:+.4f} -> {r['trained_mean']:+.4f}, effect size "
              f"{r['effect_size']:+.2f} base sd, {r['improved']:.0%} of prompts improved")
    a = results["rank_acc_held_out"]
    print(f"implicit reward on {a['groups']} held-out groups of 6: top-1 {a['top1']:.2f} (chance 0.17), "
          f"pairwise {a['pairwise']:.2f} (chance 0.50)")


def ablation_seed(out, settings, n_seeds, base, threads):
    """Every ABLATIONS row for one seed (its own cache; every row trains on the first row's rollout cache)."""
    torch.set_num_threads(threads)
    results, first = [], None
    for i, (label, change) in enumerate(ABLATIONS):
        print(f"\n=== seed {settings['seed']}, ablation {i + 1}/{len(ABLATIONS)}: {label}", flush=True)
        folder = Path(out) / f"seed{settings['seed']}" / f"row{i}"
        results.append(run(folder, {**settings, **change}, n_seeds, base, cache_from=first))
        first = first or folder
        print(f"--- seed {settings['seed']}, {label}:")
        show(results[-1])
    return results


def ablations(out, settings, n_seeds, seeds, jobs, threads):
    """The ABLATIONS rows for each seed (seeds in parallel processes with jobs > 1); one markdown table."""
    base = base_samples(settings, n_seeds)  # the base model's fresh images do not depend on the seed
    todo = [(out, {**settings, "seed": seed}, n_seeds, base, threads) for seed in seeds]
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(seeds))) as pool:
            per_seed = pool.starmap(ablation_seed, todo)
    else:
        per_seed = [ablation_seed(*t) for t in todo]
    rows = {label: [res[i] for res in per_seed] for i, (label, _) in enumerate(ABLATIONS)}
    (Path(out) / "ablations.json").write_text(json.dumps(rows, indent=2))
    fmt = lambda vals, f: " / ".join(f.format(v) for v in vals)
    lines = ["| setting | held-out effect size | held-out prompts improved | training-prompt effect size "
             "| held-out rank acc top-1 (chance 0.17) | pairwise (chance 0.50) |", "|" + " --- |" * 6]
    for label, res in rows.items():
        acc = [r["rank_acc_held_out"] for r in res]
        lines.append(f"| {label} | {fmt([r['held_out_prompts']['effect_size'] for r in res], '{:+.2f}')} "
                     f"| {fmt([r['held_out_prompts']['improved'] for r in res], '{:.0%}')} "
                     f"| {fmt([r['train_prompts']['effect_size'] for r in res], '{:+.2f}')} "
                     f"| {fmt([a['top1'] for a in acc], '{:.2f}')} | {fmt([a['pairwise'] for a in acc], '{:.2f}')} |")
    table = "\n".join(lines)
    (Path(out) / "ablations.md").write_text(table + "\n")
    return table


def run_cli(args, settings):
    t0 = time.time()
    if args.ablations:
        table = ablations(args.out, settings, args.eval_seeds, args.seeds, args.jobs, args.threads)
        print(f"\n{table}\n\n({args.command}; {time.time() - t0:.0f} s)")
        return table
    results = run(args.out, settings, args.eval_seeds)
    results["total_s"] = round(time.time() - t0, 1)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nGDRO on the toy colour reward ({results['total_s']:.0f} s; {Path(args.out) / 'results.json'}):")
    show(results)
    return results


# ============================================================================= --ocr: GDRO raises OCR accuracy
# The text model (text_model.build_text_model, pretrained here on a CPU) draws 3-digit strings that EasyOCR reads.
# The real commands end to end: gdro.py --model DIR --reward ocr on training strings (cache -> loss -> LoRA), eval.py
# on the val strings for every checkpoint (the step is chosen there, as the paper chooses its step near 300), then
# eval.py --model DIR on held-out strings (never trained on, by the model or by GDRO) from held-out seeds, base vs the
# chosen checkpoint. Each seed is its own run (its own rollouts and training draws); the two seeds run side by side,
# one CPU thread each. The ablations train on each seed's cache and are scored on the same held-out strings.
OCR_MODEL_DIR = "runs/text_model"  # built there when it holds no model; another --model-dir must hold one
OCR_TRAIN_PROMPTS = 200  # training strings drawn from the model's train split; each cached with 16 images
OCR_EVAL = {"images-per-prompt": 8, "steps": 10, "batch": 16}  # 100 held-out strings x 8 images per model
OCR_VAL_IMAGES = 4  # choosing the step: 100 val strings x 4 images per checkpoint (a paired se of about 0.013)
OCR_ABLATION_IMAGES = 4  # the ablations: the same 100 strings, 4 images each (held-out seeds; CPU time)
# The paper's loss (k = 6 of 16, beta 12, tau 0.05, gamma 0.5), 300 steps of 8 groups, LoRA rank 32. For this model,
# chosen on the val split (docs/experiments.md): CFG 4.5 (SD3's usual; the base read best there), lr 3e-3 (lr 1e-3
# moved val by +0.04 to +0.06 in 300-900 steps; a cosine decay from 3e-3 did not beat it). At lr 3e-3 the val reward
# swings between checkpoints, the same way on other val images (neither 16 groups a step nor an EMA of the LoRA
# raised the best), so a checkpoint every 25 steps (a 50-step grid missed seed 1's best) and the best on val.
OCR_GDRO = {"images-per-prompt": 16, "group-size": 6, "beta": 12.0, "tau": 0.05, "gamma": 0.5, "steps": 10,
            "guidance": 4.5, "groups-per-step": 8, "max-steps": 300, "lr": 3e-3, "lora-rank": 32, "log-every": 25,
            "save-every": 25}
OCR_ABLATIONS = [  # (row label, changes to OCR_GDRO); the first row is the main run itself
    ("GDRO (k = 6, beta = 12, tau = 0.05, gamma = 0.5), last step", {}),
    ("k = 2 (Diffusion-DPO)", {"group-size": 2}),
    ("gamma = 0 (no top-1 stabiliser)", {"gamma": 0.0}),
    ("tau = 0 (hard ranking, Eq. 12)", {"tau": 0.0}),
    ("tau = 0.5 (softer target)", {"tau": 0.5}),
    ("beta = 6 (the paper's OCR reward-hacking setting)", {"beta": 6.0}),
    ("beta = 0 (flow matching on the best image: rejection sampling)", {"beta": 0.0}),
]


def ablation_chains(out, seeds, changes, train, evaluate):
    """Per seed, the commands of an ablation table: each row after the first (changes[1:], settings changed from the
    main run's) trained by train(folder, seed, change) on a copy of the seed's main cache (the same rollouts, the same
    rewards), then evaluate(every row's LoRA, OUT/ablations/eval_seedS) scoring them all beside the base."""
    chains = []
    for s in seeds:
        rows = [out / f"seed{s}"] + [out / "ablations" / f"seed{s}" / f"row{i}" for i in range(1, len(changes))]
        for folder in rows[1:]:
            if not (folder / "cache").is_dir():
                shutil.copytree(rows[0] / "cache", folder / "cache")
        chains.append([train(folder, s, change) for folder, change in zip(rows[1:], changes[1:])]
                      + [evaluate([r / "lora" for r in rows], out / "ablations" / f"eval_seed{s}")])
    return chains


def run_chains(chains, log_names):
    """Run each chain (a list of commands, in order) in its own process line, the chains side by side, one CPU thread
    each; output to the log files. A failed command stops with one line naming its log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run_chain(chain, log):
        with open(log, "a") as f:
            for cmd in chain:
                print("$ " + " ".join(cmd), flush=True)
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode != 0:
                    return f"failed: {' '.join(cmd)} (see {log})"
        return None

    with ThreadPoolExecutor(len(chains)) as pool:
        errors = [e for e in pool.map(run_chain, chains, log_names) if e]
    if errors:
        raise SystemExit("error: " + "; ".join(errors))


def paired_gain(scores_file, lora_set="lora"):
    """From eval.py's scores.jsonl: the base's and the LoRA's mean OCR reward and exact-match share, and the standard
    error of the per-prompt paired difference (each prompt: the mean over its images, same seeds for both). Also
    each set's share of large text (text_model.large_text: the text model's readable renders) and those images'
    mean reward: whether a gain comes from leaving the small, unreadable mode or from reading the digits better."""
    rows = [json.loads(line) for line in Path(scores_file).read_text().splitlines()]
    per, large = {name: {} for name in ("base", lora_set)}, {name: [] for name in ("base", lora_set)}
    for r in rows:
        if r["set"] in per:
            per[r["set"]].setdefault(r["prompt_index"], []).append(r["ocr_reward"])
            with Image.open(Path(scores_file).parent / r["image"]) as img:
                large[r["set"]].append((text_model.large_text(img), r["ocr_reward"]))
    prompts = sorted(per["base"])
    base = np.array([np.mean(per["base"][i]) for i in prompts])
    lora = np.array([np.mean(per[lora_set][i]) for i in prompts])
    exact = {n: float(np.mean([x == 1.0 for i in prompts for x in per[n][i]])) for n in per}
    share = {n: float(np.mean([is_large for is_large, _ in large[n]])) for n in per}
    large_ocr = {n: float(np.mean([r for is_large, r in large[n] if is_large] or [np.nan])) for n in per}
    d = lora - base
    return {"base_ocr": float(base.mean()), "gdro_ocr": float(lora.mean()), "base_exact": exact["base"],
            "gdro_exact": exact[lora_set], "gain": float(d.mean()), "gain_se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "prompts_improved": float((d > 0).mean()), "prompts_worse": float((d < 0).mean()),
            "base_large_text": share["base"], "gdro_large_text": share[lora_set],
            "base_large_text_ocr": large_ocr["base"], "gdro_large_text_ocr": large_ocr[lora_set]}


def ocr_prompt_files(out, model_dir, n=OCR_TRAIN_PROMPTS):
    """OUT/train_prompts.txt: n strings of the model's train split (a fixed random draw); the validation and held-out
    prompts are the model folder's val.txt and test.txt."""
    train = Path(model_dir, "train.txt").read_text().splitlines()
    chosen = random.Random(0).sample(train, n)
    (out / "train_prompts.txt").write_text("\n".join(chosen) + "\n")
    return out / "train_prompts.txt", Path(model_dir) / "val.txt", Path(model_dir) / "test.txt"


def gdro_command(model_dir, prompts, out, seed, settings):
    """gdro.py's command line; with --resume where an earlier run left a checkpoint (a rerun continues it)."""
    resume = ["--resume"] if gdro.checkpoints(Path(out) / "checkpoints") else []
    return [sys.executable, "gdro.py", "--model", str(model_dir), "--reward", "ocr", "--prompts", str(prompts),
            "--out", str(out), "--seed", str(seed), *flags(settings), *resume]


def eval_command(model_dir, prompts, loras, out, guidance, images=OCR_EVAL["images-per-prompt"], checkpoints=None):
    """eval.py's command line: base vs each LoRA folder in loras, or vs every checkpoint in checkpoints."""
    sets = ["--checkpoints", str(checkpoints)] if checkpoints else ["--lora", *map(str, loras)] if loras else []
    return [sys.executable, "eval.py", "--model", str(model_dir), "--prompts", str(prompts), "--judge", "none",
            *sets, "--out", str(out), "--guidance", str(guidance), *flags({**OCR_EVAL, "images-per-prompt": images})]


def best_on_val(run_dir):
    """The checkpoint of run_dir with the highest mean OCR reward on the val strings (eval_val/scores.jsonl; the
    earliest of equals), and every checkpoint's val reward."""
    scores = run_dir / "eval_val" / "scores.jsonl"
    names = sorted({json.loads(line)["set"] for line in scores.read_text().splitlines()} - {"base"})
    curve = {name: paired_gain(scores, name) for name in names}
    best = max(names, key=lambda name: curve[name]["gdro_ocr"])  # max keeps the first of equals: the earliest step
    return {"step": int(best.removeprefix("step_")), "lora": str(run_dir / "checkpoints" / best),
            "val_base_ocr": curve[best]["base_ocr"], "val_ocr": {int(n.removeprefix("step_")): round(c["gdro_ocr"], 4)
                                                                 for n, c in curve.items()}}


def ocr_experiment(args, settings):
    """The main OCR experiment: the text model (built once), then per seed gdro.py, the step chosen on val, and the
    chosen checkpoint scored on the held-out strings; one JSON line."""
    t0, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)  # the text model found there (whatever its recipe), else built there now
    if not (model_dir / "text_model.json").is_file():
        text_model.build_text_model(model_dir)
    train_prompts, val_prompts, test_prompts = ocr_prompt_files(out, model_dir)
    dirs, logs = {s: out / f"seed{s}" for s in args.seeds}, [out / f"seed{s}.log" for s in args.seeds]
    run_chains([[gdro_command(model_dir, train_prompts, d, s, settings),
                 eval_command(model_dir, val_prompts, [], d / "eval_val", settings["guidance"], OCR_VAL_IMAGES,
                              checkpoints=d / "checkpoints")] for s, d in dirs.items()], logs)
    chosen = {s: best_on_val(d) for s, d in dirs.items()}
    run_chains([[eval_command(model_dir, test_prompts, [chosen[s]["lora"]], d / "eval_test", settings["guidance"])]
                for s, d in dirs.items()], logs)
    runs = [{"seed": s, **chosen[s], **paired_gain(d / "eval_test" / "scores.jsonl")} for s, d in dirs.items()]
    result = {"model_dir": str(model_dir), "train_prompts": str(train_prompts), "val_prompts": str(val_prompts),
              "heldout_prompts": str(test_prompts), "settings": settings, "seconds": round(time.time() - t0),
              "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    for r in runs:
        print(f"seed {r['seed']}: step {r['step']} (best on val); held-out OCR {r['base_ocr']:.4f} -> "
              f"{r['gdro_ocr']:.4f} ({r['gain']:+.4f} +- {r['gain_se']:.4f}), exact {r['base_exact']:.3f} -> "
              f"{r['gdro_exact']:.3f}, large text {r['base_large_text']:.0%} -> {r['gdro_large_text']:.0%}")
    print(json.dumps(result))
    return result


def ocr_ablations(args):
    """OCR_ABLATIONS on each seed's cache of the main experiment (run it first), the held-out set of the main run;
    one eval.py per seed scores every row's LoRA at its last step (no choice on val: every row on the same footing)
    beside the base. A markdown table."""
    out = Path(args.out)
    main_results = json.loads((out / "results.json").read_text())
    model_dir, heldout, settings = main_results["model_dir"], main_results["heldout_prompts"], main_results["settings"]
    chains = ablation_chains(out, args.seeds, [change for _, change in OCR_ABLATIONS], lambda folder, s, change:
                             gdro_command(model_dir, main_results["train_prompts"], folder, s, {**settings, **change}),
                             lambda loras, eval_dir: eval_command(model_dir, heldout, loras, eval_dir,
                                                                  settings["guidance"], OCR_ABLATION_IMAGES))
    run_chains(chains, [out / f"ablations_seed{s}.log" for s in args.seeds])
    table = ["| setting | held-out OCR reward (seed " + " / ".join(map(str, args.seeds)) + ") | gain +- se "
             "| exact matches | prompts improved | large text | reward of the large text |", "|" + " --- |" * 7]
    base = [paired_gain(out / "ablations" / f"eval_seed{s}" / "scores.jsonl", "lora1") for s in args.seeds]
    table.append("| base model | " + " / ".join(f"{b['base_ocr']:.3f}" for b in base) + " | | "
                 + " / ".join(f"{b['base_exact']:.3f}" for b in base) + " | | "
                 + " / ".join(f"{b['base_large_text']:.0%}" for b in base) + " | "
                 + " / ".join(f"{b['base_large_text_ocr']:.3f}" for b in base) + " |")
    rows = {}
    for i, (label, _) in enumerate(OCR_ABLATIONS):
        res = [paired_gain(out / "ablations" / f"eval_seed{s}" / "scores.jsonl", f"lora{i + 1}") for s in args.seeds]
        rows[label] = res
        table.append(f"| {label} | " + " / ".join(f"{r['gdro_ocr']:.3f}" for r in res) + " | "
                     + " / ".join(f"{r['gain']:+.3f} +- {r['gain_se']:.3f}" for r in res) + " | "
                     + " / ".join(f"{r['gdro_exact']:.3f}" for r in res) + " | "
                     + " / ".join(f"{r['prompts_improved']:.0%}" for r in res) + " | "
                     + " / ".join(f"{r['gdro_large_text']:.0%}" for r in res) + " | "
                     + " / ".join(f"{r['gdro_large_text_ocr']:.3f}" for r in res) + " |")
    (out / "ablations.json").write_text(json.dumps(rows, indent=2))
    (out / "ablations.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return rows


def check_gdro_flags(flag, argv):
    """gdro.py's own checks (its parser, check_args) of the flags a run will pass it, before anything runs: a refusal
    names `flag`, where they were set."""
    try:
        args = gdro.parse_args(argv)
    except gdro.BadInput as e:  # gdro.py's parser: an unknown flag, a value of the wrong type
        raise gdro.BadInput(f"{flag}: gdro.py {e}")
    try:
        gdro.check_args(gdro.settle_model(args), 1)
    except gdro.BadInput as e:
        raise gdro.BadInput(f"{flag}: {e}")


def gdro_flags(items):
    """--ocr-set's FLAG=VALUE words as {flag: value}; true and false stand for a flag given or left out."""
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise gdro.BadInput(f"--ocr-set {item}: expected FLAG=VALUE with FLAG a gdro.py flag without its --")
        found[key] = {"true": True, "false": False}.get(value.lower(), value)
    return found


def check_inputs(args):
    """Every flag, before a model is built or any run starts; the settings the run will use."""
    experiments.check_out(args.out)
    experiments.check(*[("--seeds", seed, experiments.AT_LEAST_0) for seed in args.seeds],
                      ("--seeds", args.seeds, (lambda x: len(set(x)) == len(x), "distinct")),
                      ("--eval-seeds", args.eval_seeds, experiments.AT_LEAST_2),
                      ("--jobs", args.jobs, experiments.AT_LEAST_1),
                      ("--threads", args.threads, experiments.AT_LEAST_1))
    if not args.ocr:
        for flag, given in (("--ocr-set", args.ocr_set), ("--model-dir", args.model_dir)):
            if given:
                raise gdro.BadInput(f"{flag} is for --ocr; the colour toy takes --set")
        settings = {**TOY, **experiments.key_values("--set", args.set, TOY, {})}
        check_gdro_flags("--set", gdro_argv(settings, Path(args.out) / "prompts.txt", args.out))
        return settings
    if args.set:
        raise gdro.BadInput("--set changes the colour toy's settings; with --ocr use --ocr-set")
    args.model_dir = args.model_dir or OCR_MODEL_DIR
    experiments.check_model_dir(args.model_dir, OCR_MODEL_DIR, "python -m experiments.text_model")
    if args.ablations:
        if not (Path(args.out) / "results.json").is_file():
            raise gdro.BadInput(f"--ablations: {Path(args.out) / 'results.json'} not found; they train on the main "
                                f"run's caches: run python -m experiments.run --ocr --out {args.out} first")
        return None  # the main run's, from its results.json
    settings = {**OCR_GDRO, **gdro_flags(args.ocr_set)}
    check_gdro_flags("--ocr-set", gdro_command(args.model_dir, "prompts.txt", args.out, 0, settings)[2:])
    return settings


def main(argv=None):
    p = experiments.Parser(description="Does GDRO learn? CPU experiments: the colour toy, and --ocr.")
    p.add_argument("--out", default=None,
                   help="run folder (default runs/experiment, runs/ablations with --ablations, runs/ocr with --ocr)")
    p.add_argument("--ablations", action="store_true", help="run the ablation table instead of the main experiment")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="seeds of the --ocr and ablation runs (each: its own cache)")
    p.add_argument("--eval-seeds", type=int, default=24, help="held-out seeds per prompt for the fresh images")
    p.add_argument("--jobs", type=int, default=2, help="ablations: seeds run in this many processes at once")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (1 for --ablations' two jobs; alone, 2 ran 1.7x faster)")
    p.add_argument("--set", nargs="*", default=[], metavar="FLAG=VALUE",
                   help="override a TOY gdro flag, e.g. max-steps=0")
    p.add_argument("--ocr", action="store_true", help="GDRO with the OCR reward on the text model pretrained here")
    p.add_argument("--model-dir", help=f"--ocr: a text model's folder (default {OCR_MODEL_DIR}, built there once)")
    p.add_argument("--ocr-set", nargs="*", default=[], metavar="FLAG=VALUE",
                   help="--ocr: change a gdro.py flag of OCR_GDRO, e.g. lr=3e-4")
    args = p.parse_args(argv)
    args.out = args.out or ("runs/ocr" if args.ocr else "runs/ablations" if args.ablations else "runs/experiment")
    settings = check_inputs(args)
    if args.ocr:
        return ocr_ablations(args) if args.ablations else ocr_experiment(args, settings)
    args.command = " ".join(["python -m experiments.run", *(sys.argv[1:] if argv is None else argv)])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_cli(args, settings)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    gdro.cli(main)
