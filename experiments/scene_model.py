"""A small StableDiffusion3Pipeline PRETRAINED HERE, on a CPU, to draw GenEval's compositional scenes: prompts in
GenEval's grammar, exactly as reward_geneval.parse_prompt reads them ("a photo of three kites", "a photo of a red
clock and a blue tv", "a photo of a bus left of a kite"), over four COCO classes drawn as flat shapes (a clock a
circle, a tv a square, a kite a triangle, a bus a long bar) in four of GenEval's colours (red, yellow, green, blue)
on white, at 64 px. experiments/scene_detector.py detects them, so GenEval's own rules (reward_geneval.explain) score
its images: GDRO's GenEval task on the CPU. Saved with save_pretrained, loaded by gdro.py / eval.py --model DIR:

    python -m experiments.scene_model --out runs/scene_model                      # the model (once; reused)
    python -m experiments.scene_model --detector-accuracy --json FILE             # the detector on VAE renders
    python -m experiments.scene_model --base-on-val --out runs/scene_model --json FILE   # the base model on val
    python gdro.py --model runs/scene_model --prompts runs/scene_model/train.txt \\
        --reward experiments/scene_detector.py:scene_reward --beta 6 --gamma 1.0

All six tags: one object, two objects, counts 2-4, a colour, the four relations, two colours attributed. Every
training image is a correct render of its prompt (its objects at random sizes and places, the colours the prompt
leaves open drawn at random); what the model gets wrong comes from its size and training, as a real model's does.
The prompts split once into train, val and test, by meaning: "a clock and a tv" and "a tv and a clock", or "a clock
left of a tv" and "a tv right of a clock", are one scene and share a split, so no test scene is trained on in other
words. The rest of the recipe is the text model's (experiments/text_model.py): frozen random character-level text
encoders (48 tokens: GenEval's longest prompts here are 43 characters), a VAE and a 6-layer SD3 transformer trained
from scratch with SD3's rectified-flow loss, 10 % empty prompts for CFG, an EMA of the weights.
"""
import itertools
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import experiments
import gdro
import reward_geneval
from experiments import text_model
from experiments.scene_detector import RGB, SHAPES, detect, scene_evaluate, scene_reward  # noqa: F401 (the reward)

SCENE_RESOLUTION = 64
SCENE_COLOURS = ("red", "yellow", "green", "blue")  # the four of GenEval's ten the renders use
SUPERSAMPLE = 4  # shapes drawn at 4x and shrunk: anti-aliased edges, as photos have
GAP = 3  # pixels between any two objects' boxes: a detector separates them
SCENE_SPLITS = {"test": 0.2, "val": 0.15}  # of each tag's scenes (at least one each); the rest are train
# The whole recipe: changing any value builds a new model (the folder's scene_model.json records it). One key may be
# added, train_prompts: pretrain on the first N training prompts only (the tests' toy model); without it, on all.
SCENE_RECIPE = dict(seed=0, variants=24, vae_steps=500, vae_batch=32, vae_lr=1e-3, steps=3500, batch=32, lr=1e-3,
                    warmup=200, ema=0.999, uncond=0.1, layers=6, heads=4, head_dim=32, clip_length=48, t5_length=48,
                    shift=1.0)


# ----------------------------------------------------------------------------- the prompts and their splits

def scene_metadata():
    """Every scene prompt's parse_prompt metadata, in tag order: the four classes alone, every ordered pair, counts
    2-4, each class in each colour, every ordered pair in each relation, every ordered pair in two different colours."""
    classes, pairs, inc = list(SHAPES), list(itertools.permutations(SHAPES, 2)), reward_geneval.include
    metas = [{"tag": "single_object", "include": [inc(c)]} for c in classes]
    metas += [{"tag": "two_object", "include": [inc(a), inc(b)]} for a, b in pairs]
    metas += [{"tag": "counting", "include": [inc(c, count=n)], "exclude": [{"class": c, "count": n + 1}]}
              for c in classes for n in (2, 3, 4)]
    metas += [{"tag": "colors", "include": [inc(c, color)]} for c in classes for color in SCENE_COLOURS]
    metas += [{"tag": "position", "include": [inc(b), inc(a, position=(rel, 0))]}
              for a, b in pairs for rel in reward_geneval.POSITIONS]
    metas += [{"tag": "color_attr", "include": [inc(a, ca), inc(b, cb)]}
              for a, b in pairs for ca, cb in itertools.permutations(SCENE_COLOURS, 2)]
    return [{**m, "prompt": reward_geneval.prompt_of(m)} for m in metas]


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def scene_key(meta):
    """What a prompt means, whatever its order of words: prompts with one key show the same scene."""
    inc = meta["include"]
    if meta["tag"] == "position":  # "X left of Y" is "Y right of X"
        (y, x), rel = (r["class"] for r in inc), inc[1]["position"][0]
        return ("position", *((x, rel, y) if x < y else (y, OPPOSITE[rel], x)))
    return (meta["tag"], *sorted((r["class"], r.get("color") or "", r["count"]) for r in inc))


def scene_splits(seed=0):
    """{split: [prompts]}: each tag's scenes (scene_key) shuffled once by seed; SCENE_SPLITS' shares of them (at least
    one scene each) are test and val, the rest train; every prompt of a scene goes with it."""
    by_tag = {}
    for meta in scene_metadata():
        by_tag.setdefault(meta["tag"], {}).setdefault(scene_key(meta), []).append(meta["prompt"])
    splits = {name: [] for name in (*SCENE_SPLITS, "train")}
    for tag in reward_geneval.TAGS:
        keys = sorted(by_tag[tag])
        random.Random(f"{seed}-{tag}").shuffle(keys)
        start = 0
        for name, share in SCENE_SPLITS.items():
            n = max(1, round(share * len(keys)))
            splits[name] += [p for k in keys[start:start + n] for p in by_tag[tag][k]]
            start += n
        splits["train"] += [p for k in keys[start:] for p in by_tag[tag][k]]
    return splits


# ----------------------------------------------------------------------------- the renderer

def shape_size(label, side):
    """(width, height) in pixels of a class's shape at size `side` (about the same area for each)."""
    return {"circle": (side, side), "square": (0.9 * side, 0.9 * side), "triangle": (1.15 * side, side),
            "bar": (1.6 * side, 0.55 * side)}[SHAPES[label]]


def draw_shape(draw, label, box, fill):
    x0, y0, x1, y1 = (v * SUPERSAMPLE for v in box)
    shape = SHAPES[label]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":  # apex up
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        draw.rectangle((x0, y0, x1, y1), fill=fill)


def separated(a, b, gap=GAP):
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def clear_relation(box_x, box_y, rel):
    """X stands `rel` of Y for GenEval (reward_geneval.relation) and plainly so: along the relation's axis the boxes
    do not overlap and the offset is at least twice the other axis' (a pixel's blur cannot flip the verdict)."""
    if rel not in reward_geneval.relation(box_x, box_y) or reward_geneval.relation(box_x, box_y) != {rel}:
        return False
    axis = 0 if rel in ("left of", "right of") else 1
    main = abs(box_x[axis] + box_x[axis + 2] - box_y[axis] - box_y[axis + 2]) / 2
    cross = abs(box_x[1 - axis] + box_x[3 - axis] - box_y[1 - axis] - box_y[3 - axis]) / 2
    return main >= 2 * cross and separated(box_x, box_y, gap=0) and (
        box_x[axis + 2] <= box_y[axis] or box_y[axis + 2] <= box_x[axis])


def scene_objects(meta, rng):
    """The objects a correct image of the prompt shows: [(class, colour)]; colours the prompt leaves open at random.
    For a position prompt, Y first and X second (parse_prompt's includes)."""
    pick = lambda: rng.choice(SCENE_COLOURS)
    return [(req["class"], req.get("color") or pick()) for req in meta["include"] for _ in range(req["count"])]


def render_scene(prompt, rng, size=SCENE_RESOLUTION):
    """(image, truth) of one correct render of a scene prompt: flat shapes on white, sizes 13-17 px, placed at random
    with GAP pixels between them, a position prompt's X plainly in its relation to Y; truth: a dict per object with
    label, color and box ([x0, y0, x1, y1], pixels). rng: a random.Random."""
    meta = reward_geneval.parse_prompt(prompt)
    objects = scene_objects(meta, rng)
    rel = meta["include"][1]["position"][0] if meta["tag"] == "position" else None
    for attempt in range(10_000):  # rejection sampling; shapes shrink a little when a crowded scene will not fit
        scale = 0.97 ** (attempt // 200)
        boxes = []
        for label, _ in objects:
            w, h = shape_size(label, rng.uniform(13, 17) * scale)
            x, y = rng.uniform(1, size - 1 - w), rng.uniform(1, size - 1 - h)
            boxes.append([x, y, x + w, y + h])
        if all(separated(a, b) for a, b in itertools.combinations(boxes, 2)) and (
                rel is None or clear_relation(boxes[1], boxes[0], rel)):
            break
    else:
        raise RuntimeError(f"no layout found for {prompt!r}")
    img = Image.new("RGB", (size * SUPERSAMPLE,) * 2, "white")
    draw = ImageDraw.Draw(img)
    for (label, colour), box in zip(objects, boxes):
        draw_shape(draw, label, box, RGB[colour])
    truth = [{"label": label, "color": colour, "box": box} for (label, colour), box in zip(objects, boxes)]
    return img.resize((size, size), Image.LANCZOS), truth


# ----------------------------------------------------------------------------- the detector against known contents

def contents_match(prompt, truth, detections):
    """Whether an image's kept detections (GenEval's threshold for the prompt's tag) are its truth: the same classes
    in the same numbers with the same colours (every object's, not only those the prompt checks), and, for a
    position prompt, GenEval's relation between the detected boxes holds."""
    meta = reward_geneval.parse_prompt(prompt)
    threshold = reward_geneval.COUNTING_THRESHOLD if meta["tag"] == "counting" else reward_geneval.THRESHOLD
    kept = [d for group in reward_geneval.keep(detections, threshold).values() for d in group]
    same = sorted((d["label"], d["color"]) for d in kept) == sorted((t["label"], t["color"]) for t in truth)
    return same and (meta["tag"] != "position" or reward_geneval.explain(meta, detections)["correct"])


def vae_roundtrip(vae, images, batch=64):
    """Images through the VAE: the posterior's mean encoded, decoded, as the model's images are made."""
    pixels, out = text_model.to_pixels(images), []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = vae.decode(vae.encode(pixels[i:i + batch]).latent_dist.mean).sample
            out += [Image.fromarray(a) for a in ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
                    .numpy()]
    return out


def detector_accuracy(vae, per_prompt=4, seed=12345):
    """The detector on fresh renders of every scene prompt (per_prompt each, layouts from seed, not the training
    renders'), clean and through the VAE: per tag and overall, the share whose kept detections match the truth
    (contents_match) and the share GenEval's rules call correct."""
    rng, rows = random.Random(seed), []
    metas = scene_metadata()
    renders = [(m, *render_scene(m["prompt"], rng)) for m in metas for _ in range(per_prompt)]
    through = vae_roundtrip(vae, [img for _, img, _ in renders]) if vae is not None else [None] * len(renders)
    for (meta, clean, truth), decoded in zip(gdro.progress(renders, "detector accuracy", "image"), through):
        row = {"tag": meta["tag"]}
        for name, img in (("clean", clean), ("vae", decoded)):
            if img is not None:
                found = detect(img)
                row[name] = contents_match(meta["prompt"], truth, found)
                row[name + "_correct"] = reward_geneval.explain(meta, found)["correct"]
        rows.append(row)
    keys = [k for k in rows[0] if k != "tag"]
    summary = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}
    per_tag = {t: {k: round(float(np.mean([r[k] for r in rows if r["tag"] == t])), 4) for k in keys}
               for t in reward_geneval.TAGS}
    return {"images": len(rows), "per_prompt": per_prompt, **summary, "per_tag": per_tag}


# ----------------------------------------------------------------------------- the model

def model_record(recipe):
    """What scene_model.json records of a build: a folder holding another record holds another model."""
    return {"recipe": {**SCENE_RECIPE, **(recipe or {})}, "classes": SHAPES, "colours": list(SCENE_COLOURS),
            "resolution": SCENE_RESOLUTION, "splits": SCENE_SPLITS}


def write_scene_prompts(folder, r):
    """folder/{train,val,test}.txt: each split's prompts, one per line."""
    for name, prompts in scene_splits(r["seed"]).items():
        (Path(folder) / f"{name}.txt").write_text("".join(p + "\n" for p in prompts))


def train_prompts(r):
    return scene_splits(r["seed"])["train"][:r.get("train_prompts")]  # a test's few, or all


def training_renders(r):
    """(prompts, images): `variants` correct renders of each training prompt, prompt by prompt, from the seed."""
    rng, prompts = random.Random(r["seed"]), train_prompts(r)
    images = [render_scene(p, rng)[0] for p in gdro.progress(prompts, "scene model: render", "prompt")
              for _ in range(r["variants"])]
    return prompts, images


def scene_vae(work, pixels, r):
    """The build's VAE (text_model.train_vae on the scene renders), trained once into work/vae and reused."""
    from diffusers import AutoencoderKL
    if (work / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)
    vae = text_model.train_vae(pixels, r)
    vae.save_pretrained(work / "vae")
    return vae


def build_scene_model(folder, recipe=None):
    """The pretrained scene model in `folder` (a diffusers folder: DiffusionPipeline.from_pretrained(folder) loads it),
    built once: a folder that already holds this recipe's model is reused. Returns the folder."""
    r, folder = {**SCENE_RECIPE, **(recipe or {})}, Path(folder)
    record, done = model_record(r), folder / "scene_model.json"
    if done.is_file():
        if json.loads(done.read_text()).get("record") != record:
            raise gdro.BadInput(f"{folder} holds a scene model of another recipe (its scene_model.json); use another "
                                "folder, or delete it to rebuild")
        return folder
    t0, work = time.time(), folder / "build"  # work: the stages' results, so an interrupted build resumes
    work.mkdir(parents=True, exist_ok=True)
    prompts, images = training_renders(r)
    pixels = text_model.to_pixels(images)
    t_vae = time.time()
    vae = scene_vae(work, pixels, r)
    t_vae = time.time() - t_vae
    state = work / "transformer_state.pt"
    resumed = torch.load(state, weights_only=True)["step"] if state.exists() else 0  # an interrupted build's steps
    t_transformer = time.time()  # the pipeline's pretraining (its few seconds of text encoding included)
    pipe = text_model.pretrain_sd3(vae, pixels, prompts, r, SCENE_RESOLUTION, state)
    t_transformer = time.time() - t_transformer
    pipe.save_pretrained(folder)
    write_scene_prompts(folder, r)
    # this process's figures: a resumed build's earlier stages and steps are not in them
    timing = {"build_seconds": round(time.time() - t0), "vae_seconds": round(t_vae),
              "transformer_seconds": round(t_transformer), "transformer_steps": r["steps"] - resumed,
              "transformer_steps_per_s": round((r["steps"] - resumed) / max(t_transformer, 1e-9), 3),
              "torch_threads": torch.get_num_threads()}
    done.write_text(json.dumps({"record": record, **timing}, indent=2))
    shutil.rmtree(work)  # the stages' checkpoints: the model is whole now
    return folder


# ----------------------------------------------------------------------------- the base model on val

FAILURES = {"missing": "missing ", "miscount": ("count ", "exclude:"), "wrong colour": "colour:",
            "wrong relation": "position:"}


def failure_kinds(failed):
    """explain's "failed" text -> the kinds of failure it names (FAILURES' keys)."""
    parts = [p for p in failed.split("; ") if p]
    return {kind for kind, starts in FAILURES.items() for p in parts if p.startswith(starts)}


def base_on_val(model_dir, prompts, images_per_prompt=18, group=6, steps=10, guidance=4.5, seed=10**6, batch=36):
    """The model's images of each prompt (seeds seed + i * n + j, gdro.generate's sampler, Euler), scored by GenEval's
    rules on the scene detector: the GenEval score (the tags' mean of the share correct), per-tag accuracy and mean
    reward, per tag the share of images failing each way (FAILURES; an image can fail several ways), and the share of
    groups of `group` consecutive images of a prompt whose top reward is shared by two or more (ties at the top)."""
    pipe, family = gdro.load_pipeline(str(model_dir))
    verdicts, n = [], images_per_prompt
    for i, prompt in enumerate(gdro.progress(prompts, "base on val", "prompt")):
        cond, uncond = gdro.encode_prompt(pipe, family, prompt)
        for b in range(0, n, batch):
            seeds = [seed + i * n + j for j in range(b, min(n, b + batch))]
            latents = gdro.generate(pipe, family, cond, uncond, seeds, steps, guidance, SCENE_RESOLUTION)
            verdicts += [{**v, "prompt": i} for v in scene_evaluate(gdro.decode(pipe, family, latents),
                                                                    [prompt] * len(seeds))]
    return summarize(verdicts, n, group) | {"prompts": len(prompts), "images_per_prompt": n, "steps": steps,
                                            "guidance": guidance, "seed": seed}


def summarize(verdicts, n, group):
    """summarize: base_on_val's figures from explain's verdicts (n consecutive ones per prompt, in prompt order)."""
    tags = {}
    for t in reward_geneval.TAGS:
        mine = [v for v in verdicts if v["tag"] == t]
        if not mine:
            continue
        kinds = [failure_kinds(v["failed"]) for v in mine]
        tags[t] = {"accuracy": round(float(np.mean([v["correct"] for v in mine])), 4),
                   "reward": round(float(np.mean([v["reward"] for v in mine])), 4), "images": len(mine),
                   "failures": {k: round(float(np.mean([k in s for s in kinds])), 4) for k in FAILURES}}
    groups = [verdicts[g:g + group] for s in range(0, len(verdicts), n) for g in range(s, s + n - group + 1, group)]
    tops = [sum(v["reward"] == max(w["reward"] for w in grp) for v in grp) for grp in groups]
    return {"geneval_score": round(float(np.mean([t["accuracy"] for t in tags.values()])), 4),
            "reward": round(float(np.mean([v["reward"] for v in verdicts])), 4), "tags": tags,
            "groups": len(groups), "tied_at_top": round(float(np.mean([k > 1 for k in tops])), 4),
            "all_tied": round(float(np.mean([k == group for k in tops])), 4)}


# ----------------------------------------------------------------------------- command line

RECIPE_RULES = {**{key: experiments.AT_LEAST_1 for key, value in SCENE_RECIPE.items() if isinstance(value, int)},
                **{key: experiments.POSITIVE for key in ("vae_lr", "lr", "shift")},
                "uncond": experiments.SHARE, "seed": experiments.AT_LEAST_0,
                "clip_length": (lambda x: x >= 44, "at least 44 (the longest prompt's characters and two)"),
                "t5_length": (lambda x: x >= 44, "at least 44 (the longest prompt's characters and two)"),
                "ema": (lambda x: 0 <= x < 1, "at least 0 and below 1")}


def check_folder(folder, recipe):
    """--out: a folder that holds no scene model, or one of this recipe (then it is reused)."""
    experiments.check_out(folder)
    done = Path(folder) / "scene_model.json"
    if done.is_file() and json.loads(done.read_text()).get("record") != model_record(recipe):
        raise gdro.BadInput(f"--out {folder} holds a scene model of another recipe (its scene_model.json); use "
                            "another folder, or delete it to rebuild")


def main(argv=None):
    p = experiments.Parser(description="Pretrain the small scene model on CPU (once); measure its detector and base.")
    p.add_argument("--out", default="runs/scene_model", help="model folder (default: %(default)s)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change a SCENE_RECIPE value, e.g. steps=100")
    p.add_argument("--detector-accuracy", action="store_true",
                   help="measure the detector on fresh renders, clean and through the VAE of --out (or its build)")
    p.add_argument("--base-on-val", action="store_true", help="score the built model's images of its val prompts")
    p.add_argument("--images-per-prompt", type=int, default=18, help="--base-on-val: images per prompt")
    p.add_argument("--per-prompt", type=int, default=8, help="--detector-accuracy: renders per scene prompt")
    p.add_argument("--json", help="write the measurement's JSON to this file too")
    args = p.parse_args(argv)
    recipe = {**SCENE_RECIPE, **experiments.key_values("--set", args.set, SCENE_RECIPE, RECIPE_RULES)}
    experiments.check(("--images-per-prompt", args.images_per_prompt, experiments.AT_LEAST_2),
                      ("--per-prompt", args.per_prompt, experiments.AT_LEAST_1))
    if args.json:
        experiments.check_out(Path(args.json).parent, "--json")
    out = Path(args.out)
    if args.detector_accuracy:
        from diffusers import AutoencoderKL
        vae_dir = out / "vae" if (out / "vae" / "config.json").is_file() else out / "build" / "vae"
        if not (vae_dir / "config.json").is_file():  # the build's first stage, alone
            out.mkdir(parents=True, exist_ok=True)
            vae = scene_vae(out / "build", text_model.to_pixels(training_renders(recipe)[1]), recipe)
        else:
            vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        result = {"vae_steps": recipe["vae_steps"], **detector_accuracy(vae, args.per_prompt)}
    elif args.base_on_val:
        if not (out / "scene_model.json").is_file():
            raise gdro.BadInput(f"--out {out} holds no scene model (no scene_model.json); build it first with "
                                f"python -m experiments.scene_model --out {out}")
        prompts = (out / "val.txt").read_text().splitlines()
        result = base_on_val(out, prompts, args.images_per_prompt)
    else:
        check_folder(out, recipe)
        build_scene_model(out, recipe)
        result = json.loads((out / "scene_model.json").read_text())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    gdro.cli(main)
