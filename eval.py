"""Evaluate GDRO: the task's score and the reward-hacking-aware corrected score, base vs GDRO side by side.

The base model and the base + LoRA draw images from the SAME seeds at the evaluation sampler settings (more steps
than the rollouts). The task scores every image: EasyOCR's OCR reward (reward_ocr.py), or with --reward geneval
GenEval's rules (reward_geneval.py: per-tag accuracy, the GenEval score, the training reward, the check each image
failed, its detections drawn on the grid). Then a UnifiedReward judge (Qwen2.5-VL) rates
alignment, coherence and style from 1 to 5. A LoRA that hacks the OCR reward (huge text, lost detail, broken
style) raises the reward r but lowers the judge's mean u, so the paper's corrected score r * (u - 3) + 0.2 falls.

    python eval.py --prompts ocr_test.txt --lora runs/ocr/lora --out runs/ocr/eval
    python eval.py --prompts ocr_test.txt --checkpoints runs/ocr/checkpoints --out runs/ocr/eval   # trend over steps
    python eval.py --prompts ocr_test.txt --tiny --lora runs/t/lora --judge none --out runs/t/eval  # CPU, seconds
    python eval.py --prompts geneval_test.txt --reward geneval --lora runs/geneval/lora --out runs/geneval/eval

Writes OUT/report.json (+ the same as a table), OUT/scores.jsonl (every image: its OCR reward, judge scores and
the judge's answer), OUT/images/SET/PPPP_J.png, OUT/grid.png (labelled columns: base, newest checkpoint, LoRA);
with --checkpoints also OUT/trend.json and trend.png. Every input is checked before a model loads: a refused one
stops with one line and exit code 2; a failure after that, one line and exit code 1.
"""
import functools
import gc
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import gdro
from reward_ocr import has_ocr_target, ocr_target

# ----------------------------------------------------------------------------- config

TINY_EVAL = ("resolution", "max_prompts", "steps")  # what --tiny shrinks here, to families.TINY_RUN's values

def parse_args(argv=None):
    p = gdro.Parser(description="Evaluate a GDRO LoRA: the task's score, judge scores, corrected score.")
    p.add_argument("--prompts", required=True,
                   help="test prompt file, one prompt per line (OCR: target text in double quotes; GenEval's grammar)")
    p.add_argument("--lora", nargs="+", default=None,
                   help="LoRA folder(s) to compare with the base model (gdro.py's OUT/lora)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength; 0 reproduces the base images exactly")
    p.add_argument("--checkpoints", default=None, help="gdro.py's OUT/checkpoints: evaluate every step_* for the trend")
    p.add_argument("--images", metavar="DIR", help="score images made elsewhere instead of drawing any (no model "
                                                   "loads): --images-per-prompt files per prompt line, in name order")
    p.add_argument("--out", default="runs/eval",
                   help="output folder: report.json, scores.jsonl, images/, grid.png, trend.*")
    gdro.add_model_flags(p)
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt and per model")
    p.add_argument("--quantize", default="none", choices=list(gdro.QUANTIZE),
                   help="the transformer's weights, as gdro.py --quantize trains against (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40,
                   help="ODE sampler steps (the evaluation setting; rollouts use fewer)")
    p.add_argument("--batch", type=int, default=8, help="images generated per pipeline call")
    p.add_argument("--seed", type=int, default=10**6,
                   help="image j of prompt i uses seed+i*n+j; far from gdro.py's rollout seeds")
    p.add_argument("--judge", default="CodeGoat24/UnifiedReward-2.0-qwen-7b",
                   help="UnifiedReward (Qwen2.5-VL) hub id or local folder, or 'none'")
    p.add_argument("--judge-batch", type=int, default=8, help="images per judge call")
    p.add_argument("--judge-max-new-tokens", type=int, default=256, help="longest judge answer, in tokens")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.tiny:
        tiny = gdro.companion("--tiny")
        tiny.shrink_if_tiny(args, argv, {k: v for k, v in tiny.TINY_RUN.items() if k in TINY_EVAL})
    return gdro.settle_model(args)


# ----------------------------------------------------------------------------- inputs, all checked before a model loads
# A refused input is a gdro.BadInput: one line naming the flag or file and what would do, exit code 2.

def check_args(args):
    """One rule a flag, in gdro.check_args' words ('--flag value: must be ...')."""
    value, factor = functools.partial(gdro.flag_value, args), gdro.RESOLUTION_FACTOR
    rules = [("--resolution", args.resolution >= factor and args.resolution % factor == 0,
              f"a positive multiple of {factor} (the VAE's 8x and the 2x2 patches)"),
             ("--lora-scale", math.isfinite(args.lora_scale), "finite"),
             ("--guidance", args.guidance is None or (math.isfinite(args.guidance) and args.guidance >= 0),
              "finite and >= 0"),
             *[(flag, value(flag) >= 1, "at least 1") for flag in
               ("--images-per-prompt", "--steps", "--batch", "--judge-batch", "--judge-max-new-tokens")],
             ("--max-prompts", args.max_prompts is None or args.max_prompts >= 1, "at least 1"),
             ("--seed", args.seed >= 0, ">= 0"),
             ("--quantize", args.quantize != "nf4" or torch.cuda.is_available(), "int8 without CUDA"),
             ("--reward", gdro.known_reward(args.reward), "ocr, geneval or an existing FILE.py:FUNCTION")]
    for flag, ok, must in rules:
        if not ok:
            raise gdro.BadInput(f"{flag} {value(flag)}: must be {must}")

def check_out(out):
    """--out: a folder to write into (made with its parents if missing), so neither a file nor under one."""
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise gdro.BadInput(f"--out {out} is a file, not a folder" if existing == out else
                            f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise gdro.BadInput(f"--out {out}: {existing} is not a writable folder")

def find_checkpoints(folder):
    """{step: folder} of gdro.py's OUT/checkpoints/step_NNNNNN (its .step_*.tmp folders are unfinished; skipped)."""
    if not Path(folder).is_dir():
        raise gdro.BadInput(f"--checkpoints {folder}: checkpoints folder not found (expected gdro.py's "
                            "OUT/checkpoints)")
    found = {int(m.group(1)): d for d in Path(folder).iterdir()
             if (m := re.fullmatch(r"step_(\d+)", d.name)) and (d / gdro.LORA_FILE).is_file()}
    if not found:
        raise gdro.BadInput(f"--checkpoints {folder} holds no step_* checkpoint with {gdro.LORA_FILE} "
                            "(expected gdro.py's OUT/checkpoints after its first --save-every steps)")
    return dict(sorted(found.items()))

LORA_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")  # diffusers' format, as gdro.save_lora writes it

def lora_layers(folder):
    """{layer: {'A': [rank, in], 'B': [out, rank]}} of a LoRA folder, from its file's header (no tensor is read):
    refused unless the file is whole and a transformer LoRA in diffusers' format."""
    file = Path(folder) / gdro.LORA_FILE
    if not file.is_file():
        raise gdro.BadInput(f"--lora {folder}: not a LoRA folder (expected {gdro.LORA_FILE} in it: gdro.py's OUT/lora)")
    damaged = gdro.damaged_file(folder, [gdro.LORA_FILE])
    if damaged:
        raise gdro.BadInput(f"LoRA file {damaged} is damaged (not what its {gdro.SHA256_FILE} recorded when it was "
                            "saved); train it again, or evaluate another checkpoint")
    try:
        with safe_open(file, "pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise gdro.BadInput(f"LoRA file {file} is unreadable ({str(e).strip().splitlines()[0]}); expected a "
                            "safetensors file as gdro.py saves it: train it again, or evaluate another checkpoint")
    layers, expected = {}, "keys transformer.LAYER.lora_A.weight and lora_B.weight, as gdro.py saves"
    for key, shape in shapes.items():
        m = LORA_KEY.fullmatch(key)
        if m is None or len(shape) != 2:
            raise gdro.BadInput(f"LoRA file {file} holds {key} {shape}: not a LoRA of a transformer ({expected})")
        layers.setdefault(m[1], {})[m[2]] = shape
    unpaired = next((name for name, ab in layers.items() if len(ab) < 2 or ab["A"][0] != ab["B"][1]), None)
    if not layers or unpaired:
        raise gdro.BadInput(f"LoRA file {file} " + (f"has no lora_A and lora_B of one rank for {unpaired}" if unpaired
                                                    else "holds no tensors") + f" ({expected})")
    return layers

def check_fits(transformer, folder, layers):
    """Every layer of the LoRA onto a linear layer of this transformer of its size, checked before diffusers loads
    it: diffusers only warns about a tensor with no layer, and a LoRA partly loaded is a wrong evaluation."""
    modules = dict(transformer.named_modules())
    features = lambda name: (getattr(modules.get(name), "in_features", None),
                             getattr(modules.get(name), "out_features", None))  # (None, None): no linear layer
    misfits = [name for name, ab in layers.items() if features(name) != (ab["A"][1], ab["B"][0])]
    if misfits:
        name, (a, b) = misfits[0], features(misfits[0])
        why = "no such linear layer" if a is None else \
            f"{a} -> {b} features there, {layers[name]['A'][1]} -> {layers[name]['B'][0]} in the LoRA"
        raise gdro.BadInput(f"LoRA {folder}: {len(misfits)} of its {len(layers)} layers fit no layer of this "
                            f"transformer, e.g. {name} ({why}); a LoRA of another model or family?")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

def image_files(args, n_prompts):
    """--images: its image files in natural name order ("2.png" before "10.png"), --images-per-prompt per prompt
    line; each decoded now, so that a bad one is refused before any scoring."""
    folder = Path(args.images)
    if args.lora or args.checkpoints:
        raise gdro.BadInput("--images scores a folder of images; --lora and --checkpoints draw new ones: give one")
    if not folder.is_dir():
        raise gdro.BadInput(f"--images {folder}: not a folder")
    key = lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=key)
    if len(files) != n_prompts * args.images_per_prompt:
        raise gdro.BadInput(f"--images {folder} holds {len(files)} images; {n_prompts} prompt lines x "
                            f"--images-per-prompt {args.images_per_prompt} expected")
    for file in files:
        try:
            with Image.open(file) as im:
                im.load()
        except Exception as e:
            raise gdro.BadInput(f"--images: cannot read {file} ({type(e).__name__}: {e})")
    return files

def check_judge(name):
    """Resolve the judge's config now (cheap), so a bad --judge fails before the images are generated."""
    if not Path(name).is_dir() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):  # not a hub id
        raise gdro.BadInput(f"--judge {name}: folder not found; expected a UnifiedReward (Qwen2.5-VL) hub id or "
                            "local folder, or none")
    from transformers import AutoConfig
    try:
        model_type = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as e:
        raise gdro.BadInput(f"--judge {name}: cannot load its config ({str(e).strip().splitlines()[0]}); expected a "
                            "UnifiedReward (Qwen2.5-VL) hub id or local folder, or none")
    if model_type != "qwen2_5_vl":
        raise gdro.BadInput(f"--judge {name} is a {model_type!r} model; expected a UnifiedReward (Qwen2.5-VL) model, "
                            "or none")

# ----------------------------------------------------------------------------- generation and OCR

def image_name(i, j):
    return f"{i:04d}_{j}.png"

def set_lora(pipe, folder, scale):
    """Make the pipeline the base model (folder None) or base + that LoRA: the previous LoRA is unloaded first, so
    the transformer is exactly the base again and adapters never stack."""
    pipe.unload_lora_weights()
    if folder is None:
        return
    from diffusers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # hide diffusers' notes on the text encoders (gdro.py trains none)
    try:  # check_fits passed: a failure here is diffusers' own, still one line
        pipe.load_lora_weights(str(folder), adapter_name="gdro")
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot load LoRA {folder} into this model: {str(e).strip().splitlines()[0]}")
    finally:
        logging.set_verbosity(verbosity)
    pipe.set_adapters("gdro", scale)

@functools.cache
def load_ocr():
    """EasyOCR loads once per process (~8 s on CPU), however often main() runs."""
    from reward_ocr import OcrReward
    return OcrReward()

def load_scorer(args, out):
    """fn(images, prompts) -> per image a dict: its "reward", and with --reward geneval GenEval's "correct", "tag",
    "failed" (the check that failed) and "detections" (reward_geneval's evaluate)."""
    if args.reward == "geneval":
        return gdro.load_reward("geneval", args.geneval_detector, args.geneval_clip,
                                args.tiny and out / "tiny_geneval").evaluate
    reward = load_ocr() if args.reward == "ocr" else gdro.load_reward(args.reward)
    return lambda images, prompts: [{"reward": float(r)} for r in reward(images, prompts)]

def same_weights(a, b):
    """Do two LoRA folders hold the same tensors? (gdro.py's last checkpoint is its final LoRA.)"""
    x, y = load_file(Path(a) / gdro.LORA_FILE), load_file(Path(b) / gdro.LORA_FILE)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

def collect_set(files, prompts, args, folder, scorer):
    """--images: the given files as image j of prompt i (folder/PPPP_J.png, as generate_set names them), scored."""
    n, scored = args.images_per_prompt, []
    folder.mkdir(parents=True, exist_ok=True)
    for b in gdro.progress(range(0, len(files), args.batch), f"{args.reward} images", "batch"):
        images = [Image.open(f).convert("RGB") for f in files[b:b + args.batch]]
        for k, image in enumerate(images, b):
            image.save(folder / image_name(*divmod(k, n)))
        scored += scorer(images, [prompts[k // n] for k in range(b, b + len(images))])
    return scored

def nan_images(latents):
    """How many images of a batch have a NaN or inf in their latents (NaN weights, a huge --lora-scale): they decode
    to black and score 0, which alone would read as a bad LoRA, not a broken one."""
    return int((~torch.isfinite(latents).flatten(1).all(1)).sum())

def generate_set(pipe, family, prompts, args, folder, scorer, desc):
    """Image j of prompt i from seed gdro.image_seed(args.seed, i, j, n), saved as folder/PPPP_J.png; returns their
    scores (load_scorer's dicts) in that order and how many were not finite. Batches mix prompts; each image has its
    own generator, so it depends only on its seed."""
    n = args.images_per_prompt
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    scored, nan, bar = [], 0, gdro.progress(None, desc, "image", total=len(jobs))
    for b in range(0, len(jobs), args.batch):
        batch = jobs[b:b + args.batch]
        enc = {i: gdro.encode_prompt(pipe, family, prompts[i]) for i, _ in batch}
        cond, uncond = ({k: torch.cat([enc[i][side][k] for i, _ in batch]) for k in enc[batch[0][0]][side]}
                        for side in (0, 1))  # one row per image; gdro.generate leaves a full batch as it is
        seeds = [gdro.image_seed(args.seed, i, j, n) for i, j in batch]
        latents = gdro.generate(pipe, family, cond, uncond, seeds, args.steps, args.guidance, args.resolution)
        nan += nan_images(latents)
        images = gdro.decode(pipe, family, latents)
        for (i, j), image in zip(batch, images):
            image.save(folder / image_name(i, j))
        scored += scorer(images, [prompts[i] for i, _ in batch])
        bar.update(len(batch))
    bar.close()
    return scored, nan

# ----------------------------------------------------------------------------- the judge (UnifiedReward 2.0)
# The pointwise prompt the judge was trained on; keep it exact. {prompt} is the generation prompt.

JUDGE_PROMPT = "\n".join([
    "You are presented with a generated image and its associated text caption. Your task is to analyze "
    "the image across multiple dimensions in relation to the caption. Specifically:",
    "Provide overall assessments for the image along the following axes (each rated from 1 to 5):",
    "- Alignment Score: How well the image matches the caption in terms of content.",
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, etc.).",
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.",
    "",
    "Output your evaluation using the format below:",
    "",
    "Alignment Score (1-5): X",
    "Coherence Score (1-5): Y",
    "Style Score (1-5): Z",
    "",
    "Your task is provided as follows:",
    "Text Caption: [{prompt}]",
])

AXES = ("alignment", "coherence", "style")
# "Alignment Score (1-5): 2.69", also "**Alignment Score (1-5):** 4" or "alignment score: 4"; a number must follow
SCORE_RE = {a: re.compile(rf"{a}\s+score\s*(?:\(\s*1\s*-\s*5\s*\))?[\s*:]*(\d+(?:\.\d+)?)", re.I) for a in AXES}

def parse_judge(answer):
    """{'alignment', 'coherence', 'style'} -> float from the judge's answer, or None when any score is missing or
    outside 1-5 (an unparsed answer is counted and reported, never scored)."""
    scores = {}
    for axis, pattern in SCORE_RE.items():
        m = pattern.search(answer or "")
        if m is None or not 1 <= float(m.group(1)) <= 5:
            return None
        scores[axis] = float(m.group(1))
    return scores

def load_judge(name, device):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(name)
    processor.tokenizer.padding_side = "left"  # batched generation: every row's answer starts right after its prompt
    return model, processor

@torch.no_grad()
def judge_answers(model, processor, images, prompts, max_new_tokens=256):
    """The judge's answers for a batch: per image one user message, the image first, then JUDGE_PROMPT. Greedy."""
    messages = [[{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": JUDGE_PROMPT.replace("{prompt}", p)}]}]
                for p in prompts]
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    inputs = processor(text=texts, images=list(images), padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

def judge_set(model, processor, folder, prompts, args, desc):
    """The judge's answers for every image of one set, read back from folder in generate_set's order."""
    n, answers = args.images_per_prompt, []
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    for b in gdro.progress(range(0, len(jobs), args.judge_batch), desc, "batch"):
        batch = jobs[b:b + args.judge_batch]
        images = [Image.open(folder / image_name(i, j)).convert("RGB") for i, j in batch]
        answers += judge_answers(model, processor, images, [prompts[i] for i, _ in batch], args.judge_max_new_tokens)
    return answers

# ----------------------------------------------------------------------------- scores and report

def corrected_score(r, u):
    """The paper's reward-hacking-aware score: r * (u - 3) + 0.2, with r the mean task reward (in [0, 1]) and u the
    mean judge score (in [1, 5]). A neutral judge (u = 3) gives 0.2 whatever r is: reward counts only as much as
    the judge likes the images, and a judge below 3 turns more reward into a lower score."""
    return r * (u - 3) + 0.2

def mean(xs):
    return sum(xs) / len(xs) if xs else None

def geneval_summary(scored):
    """GenEval's figures of one set: the share of correct images per tag, the score (the six tags' plain mean, as the
    benchmark's), the mean training reward."""
    from reward_geneval import TAGS
    tags = {t: mean([float(s["correct"]) for s in scored if s["tag"] == t]) for t in TAGS}
    present = [a for a in tags.values() if a is not None]
    return {"geneval_score": mean(present), "tag_accuracy": tags, "reward": mean([s["reward"] for s in scored])}

def summarize(rewards, scores, geneval=None):
    """One set's report entry. scores is None without a judge, else per image a dict of AXES or None (unparsed);
    geneval: with --reward geneval, its per-image dicts. The corrected score's r is the task's figure: OCR's mean
    reward, or GenEval's score."""
    figures = geneval_summary(geneval) if geneval else \
        {"ocr_reward": mean(rewards), "ocr_exact": mean([float(x == 1.0) for x in rewards])}
    r, judge, corrected = figures.get("geneval_score", mean(rewards)), None, None
    if scores is not None:
        parsed = [s for s in scores if s is not None]
        judge = {a: mean([s[a] for s in parsed]) for a in AXES}
        judge["mean"] = mean([sum(s.values()) / len(AXES) for s in parsed])  # u: per image the mean of the three
        judge["unparsed"] = len(scores) - len(parsed)
        corrected = None if judge["mean"] is None else corrected_score(r, judge["mean"])
    return {**figures, "n_images": len(rewards), "judge": judge, "corrected_score": corrected}

def print_table(entries):
    """The report as a table: the task's figures (OCR's, or GenEval's score, reward and six tags), the judge's."""
    fmt = lambda v: f"{v:>10.4f}" if isinstance(v, float) else f"{'-' if v is None else v:>10}"
    first = next(iter(entries.values()))
    task = ({"GenEval": "geneval_score", "reward": "reward"} if "geneval_score" in first else
            {"OCR": "ocr_reward", "exact": "ocr_exact"})
    tags = list(first.get("tag_accuracy", {}))
    print(f"{'':<12}" + "".join(f"{h:>10}" for h in [*task, *(t[:9] for t in tags), "align", "coher", "style",
                                                    "judge u", "unparsed", "corrected", "images", "NaN imgs"]))
    for name, e in entries.items():
        j = e["judge"] or {}
        cells = [*(e[k] for k in task.values()), *(e["tag_accuracy"][t] for t in tags),
                 *(j.get(a) for a in (*AXES, "mean", "unparsed")), e["corrected_score"], e["n_images"], e["nan_images"]]
        print(f"{name:<12}" + "".join(fmt(v) for v in cells))

def grid_columns(sets, twins):
    """The sets grid.png shows, at most three: the base, the newest checkpoint, the LoRA. The checkpoint is left out
    when the LoRA holds its very weights (gdro.py's final LoRA is its last checkpoint): the column would repeat."""
    steps = [name for name in sets if name.startswith("step_")]  # sets keeps the checkpoints in step order
    newest = steps[-1] if steps else None
    same = lambda name: twins.get(name, name)  # twins: a set -> the earlier set of the same weights
    if "lora" in sets and newest is not None and same(newest) == same("lora"):
        newest = None
    several = [name for name in sets if re.fullmatch(r"lora\d+", name)]  # eval.py --lora A B ...: lora1, lora2, ...
    return [name for name in ("base", newest, "lora", "images") if name in sets] + several

def column_label(name, twins):
    """A column's header: 'base', 'step 300', 'LoRA', or 'LoRA = step 300' when the LoRA is that checkpoint."""
    step = lambda n: f"step {int(n.removeprefix('step_'))}"
    if name.startswith("step_"):
        return step(name)
    if name == "lora":
        return f"LoRA = {step(twins['lora'])}" if twins.get("lora", "").startswith("step_") else "LoRA"
    return f"LoRA {name.removeprefix('lora')}" if name.startswith("lora") else name

def fit_lines(text, font, width, max_lines):
    """Word-wrap text to lines of at most width pixels; a cut (too many lines, or one overlong word) ends in '…'."""
    lines = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    cut, lines = len(lines) > max_lines, lines[:max_lines]
    for k, line in enumerate(lines):
        if (cut and k == len(lines) - 1) or font.getlength(line) > width:
            while line and font.getlength(line + "…") > width:
                line = line[:-1]
            lines[k] = line + "…"
    return lines

GRID_TILE, GRID_LABEL_W, GRID_HEADER, GRID_CAPTION = 256, 224, 32, 24  # grid.png layout, in pixels

def draw_detections(draw, x, y, scale, found):
    """GenEval's kept detections on a tile at (x, y) drawn scale times its image's size: box, class and colour."""
    for d in found:
        box = [x + d["box"][0] * scale, y + d["box"][1] * scale, x + d["box"][2] * scale, y + d["box"][3] * scale]
        draw.rectangle(box, outline=(255, 0, 255), width=2)
        draw.text((box[0] + 3, box[1] + 2), " ".join(filter(None, (d.get("color"), d["label"]))), fill=(255, 0, 255))

def caption(s):
    """Under a grid tile: the OCR reward, or GenEval's verdict, reward and the check that failed."""
    if "correct" not in s:
        return f"OCR {s['reward']:.2f}"
    return f"{'correct' if s['correct'] else 'wrong'} {s['reward']:.2f} {s['failed']}".strip()

def draw_grid(path, images_dir, columns, scored, prompts, n, rows=8):
    """The first image of the first 8 prompts, one row each, one column per set; columns is {set name: header}.
    The left margin names each row's OCR target (or GenEval tag) and (shortened) prompt; under each tile, its OCR
    reward (or GenEval's verdict and the check that failed), with GenEval's kept detections drawn on it."""
    head, target_font, prompt_font = (ImageFont.load_default(size=s) for s in (18, 16, 13))
    rows, tile, pad = min(rows, len(prompts)), GRID_TILE, 8
    grid = Image.new("RGB", (GRID_LABEL_W + tile * len(columns), GRID_HEADER + rows * (tile + GRID_CAPTION)), "white")
    draw = ImageDraw.Draw(grid)
    first = scored[next(iter(columns))]  # every set scored the same prompts
    geneval = "correct" in first[0]
    draw.text((pad, GRID_HEADER // 2), "tag, prompt" if geneval else "OCR target, prompt", fill="black", font=head,
              anchor="lm")
    for c, label in enumerate(columns.values()):
        draw.text((GRID_LABEL_W + c * tile + tile // 2, GRID_HEADER // 2), label, fill="black", font=head, anchor="mm")
    for i in range(rows):
        y = GRID_HEADER + i * (tile + GRID_CAPTION)
        label = (first[i * n]["tag"] if geneval else  # a custom reward's prompt may quote nothing
                 f'"{ocr_target(prompts[i])}"' if has_ocr_target(prompts[i]) else "")
        target = fit_lines(label, target_font, GRID_LABEL_W - 2 * pad, 2)
        prompt = fit_lines(prompts[i], prompt_font, GRID_LABEL_W - 2 * pad, 6)
        draw.multiline_text((pad, y + pad), "\n".join(target), fill="black", font=target_font)
        draw.multiline_text((pad, y + pad + 22 * len(target)), "\n".join(prompt), fill=(90, 90, 90), font=prompt_font)
        for c, name in enumerate(columns):
            x = GRID_LABEL_W + c * tile
            image = Image.open(images_dir / name / image_name(i, 0)).convert("RGB")
            grid.paste(image.resize((tile, tile)), (x, y))
            draw_detections(draw, x, y, tile / image.width, scored[name][i * n].get("detections", []))
            text = fit_lines(caption(scored[name][i * n]), prompt_font, tile - 12, 1)[0]
            draw.text((x + 6, y + tile + 3), text, fill="black", font=prompt_font if geneval else target_font)
    grid.save(path)

def draw_trend(path, points):
    """The task's figure (OCR reward, GenEval score) and (when judged) the corrected score against the training step,
    as a PNG; returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, and pyplot's global state untouched
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(7.2, 4.4), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    task = ("GenEval score", "geneval_score") if "geneval_score" in points[0] else ("OCR reward", "ocr_reward")
    for label, key in (task, ("corrected score", "corrected_score")):
        xy = [(p["step"], p[key]) for p in points if p[key] is not None]
        if xy:
            ax.plot(*zip(*xy), marker="o", label=label)
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, -0.05), max(high, 1.05))  # the reward's whole range [0, 1] stays in view
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: round integers, not 312, 623, 935
    ax.set(xlabel="training step (0: the base model)", ylabel="score")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return fig

# ----------------------------------------------------------------------------- main

def draw_sets(args, sets, layers, prompts, out, device):
    """Each set's images drawn from the same seeds (generate_set) and scored: (scored, nan, twins) by set name; the
    generator is freed at the end, so that the judge fits the GPU after it."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe, family = gdro.load_pipeline(args.model, args.tiny, args.family, device, dtype)
    if args.quantize != "none":  # the base and each LoRA on the quantized weights
        quantize = gdro.companion("--quantize").quantize
        pipe.transformer = quantize(pipe.transformer, args.quantize, None if args.tiny else args.model, device)
    for name, found in layers.items():  # a LoRA that does not fit this model fails now, not after the base images
        check_fits(pipe.transformer, sets[name], found)
    images_dir = out / "images"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**vars(args), "family": family.name}, indent=2))
    scorer = load_scorer(args, out)
    scored, nan, twins = {}, {}, {}
    for name, folder in sets.items():
        twin = next((m for m in scored if folder and sets[m] and same_weights(sets[m], folder)), None)
        if twin:  # the final LoRA is the last checkpoint: same weights, same seeds, same images; reuse them
            twins[name], scored[name], nan[name] = twin, scored[twin], nan[twin]
            shutil.copytree(images_dir / twin, images_dir / name, dirs_exist_ok=True)
            continue
        set_lora(pipe, folder, args.lora_scale)
        scored[name], nan[name] = generate_set(pipe, family, prompts, args, images_dir / name, scorer,
                                               f"generate + {args.reward} {name}")
        if nan[name]:
            print(f"warning: {name}: {nan[name]} of {len(scored[name])} images have NaN or inf latents and score 0 "
                  "(nan_images in the report); look at the weights, --lora-scale and --guidance")

    del pipe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return scored, nan, twins

def main(argv=None):
    """The whole evaluation: python eval.py ARGS, or eval.main([ARGS...]); returns the report dict."""
    args = parse_args(argv)
    check_args(args)
    prompts = gdro.read_prompts(args.prompts, args.reward, args.max_prompts)
    check_out(args.out)
    files = image_files(args, len(prompts)) if args.images else None
    checkpoints = find_checkpoints(args.checkpoints) if args.checkpoints else {}
    # every set of images: the base, each checkpoint (the trend), the LoRA; all from the same seeds (or --images')
    sets = {"images": None} if files else {"base": None, **{f"step_{s:06d}": d for s, d in checkpoints.items()}}
    loras = args.lora or []  # one is "lora"; several (say, ablations) are lora1, lora2, ... in the given order
    sets.update({"lora" if len(loras) == 1 else f"lora{i + 1}": Path(f) for i, f in enumerate(loras)})
    layers = {name: lora_layers(folder) for name, folder in sets.items() if folder}
    if args.judge != "none":
        check_judge(args.judge)

    out, images_dir = Path(args.out), Path(args.out) / "images"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if files:
        out.mkdir(parents=True, exist_ok=True)
        scorer = load_scorer(args, out)
        scored = {"images": collect_set(files, prompts, args, images_dir / "images", scorer)}
        nan, twins = {"images": 0}, {}  # files are pixels already: none is NaN
    else:
        scored, nan, twins = draw_sets(args, sets, layers, prompts, out, device)
    answers = {name: None for name in sets}
    if args.judge != "none":
        model, processor = load_judge(args.judge, device)
        for name in sets:
            answers[name] = answers[twins[name]] if name in twins else \
                judge_set(model, processor, images_dir / name, prompts, args, f"judge {name}")
    scores = {name: None if a is None else [parse_judge(x) for x in a] for name, a in answers.items()}

    task = "geneval" if args.reward == "geneval" else "ocr"
    entries = {name: {**summarize([s["reward"] for s in scored[name]], scores[name],
                                  scored[name] if task == "geneval" else None), "nan_images": nan[name]}
               for name in sets}
    report = {k: v for k, v in entries.items() if not k.startswith("step_")}  # the base and each LoRA
    (out / "report.json").write_text(json.dumps(report, indent=2))
    n = args.images_per_prompt
    with open(out / "scores.jsonl", "w") as f:
        for name in sets:
            for k, s in enumerate(scored[name]):
                i, j = divmod(k, n)
                task_scores = s if task == "geneval" else {"ocr_reward": s["reward"]}
                f.write(json.dumps({"set": name, "prompt_index": i, "seed": gdro.image_seed(args.seed, i, j, n),
                                    "prompt": prompts[i], "image": f"images/{name}/{image_name(i, j)}", **task_scores,
                                    "judge": None if scores[name] is None else scores[name][k],
                                    "judge_answer": None if answers[name] is None else answers[name][k]}) + "\n")
    print_table(entries)
    columns = {name: column_label(name, twins) for name in grid_columns(sets, twins)}
    draw_grid(out / "grid.png", images_dir, columns, scored, prompts, n)
    if checkpoints:  # the reward-hacking trend: the base model is step 0
        trend = [{"step": 0, "name": "base", **entries["base"]}]
        trend += [{"step": s, "name": f"step_{s:06d}", **entries[f"step_{s:06d}"]} for s in checkpoints]
        (out / "trend.json").write_text(json.dumps(trend, indent=2))
        draw_trend(out / "trend.png", trend)
    print(f"wrote {out / 'report.json'}, {out / 'grid.png'}" + (f", {out / 'trend.png'}" if checkpoints else ""))
    return report

if __name__ == "__main__":
    gdro.cli(main)
