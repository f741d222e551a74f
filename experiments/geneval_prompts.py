"""GenEval's prompt sets, drawn here by GenEval's recipe: geneval_test.txt (the benchmark) and geneval.txt (training).

GenEval's generator draws, with numpy's default_rng(43): the 80 classes once each (single_object), then 100 draws
of each other tag (two_object, counting, colors, position, color_attr), each class or colour uniform (two different
classes or colours in a pair; "person" never coloured; counts 2-4), and drops repeated prompts: 553 prompts
(80 / 99 / 80 / 94 / 100 / 100). `benchmark` makes the same draws in the same order, so geneval_test.txt is the
benchmark's prompt list, line for line.

The training set (`training`) holds PER_TAG lines of each tag but single_object: the test set holds every
single-object prompt there is. Each tag's prompts are all of its grammar's, in a seeded random order, less any that
matches a test prompt with the objects in either order (a pair of the same objects is the same prompt: "a dog left
of a cat" excludes "a cat below a dog"; for color_attr a pair of the same coloured objects). Counting and colors run
out first (GenEval's grammar has 240 and 790 of them, before the test set takes its share): their prompts repeat,
one after the other in that order, until the tag has PER_TAG lines (gdro.py draws each line's images from its own
seeds). The lines are shuffled together, so that any first N lines (--max-prompts N) mix the tags.

    python -m experiments.geneval_prompts              # writes geneval.txt and geneval_test.txt (seconds)
    python -m experiments.geneval_prompts --check      # the two files are what the recipe makes
"""
import itertools
from pathlib import Path

import numpy as np

import gdro
from reward_geneval import COCO_CLASSES, COLORS, NUMBERS, POSITIONS, TAGS, include, parse_prompt, prompt_of

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK_SEED, BENCHMARK_DRAWS = 43, 100  # GenEval's create_prompts.py defaults
TRAIN_SEED, PER_TAG = 0, 1000
FILES = {"test": "geneval_test.txt", "train": "geneval.txt"}
PERSON = COCO_CLASSES.index("person")


def metadata(tag, *includes, exclude=None):
    """GenEval's metadata dict, its prompt written by reward_geneval.prompt_of."""
    meta = {"tag": tag, "include": list(includes), **({"exclude": exclude} if exclude else {})}
    return {**meta, "prompt": prompt_of(meta)}


# A tag's metadata from what was drawn: classes, then a count, colours or a relation
BUILD = {"two_object": lambda a, b: metadata("two_object", include(a), include(b)),
         "counting": lambda c, n: metadata("counting", include(c, count=n), exclude=[{"class": c, "count": n + 1}]),
         "colors": lambda c, color: metadata("colors", include(c, color)),
         "position": lambda a, b, rel: metadata("position", include(b), include(a, position=(rel, 0))),
         "color_attr": lambda a, b, ca, cb: metadata("color_attr", include(a, ca), include(b, cb))}


# GenEval's draws: one prompt each, from the generator's next numbers, in GenEval's order of calls.

def draw_two_object(rng):
    a, b = rng.choice(len(COCO_CLASSES), size=2, replace=False)
    return BUILD["two_object"](COCO_CLASSES[a], COCO_CLASSES[b])


def draw_counting(rng):
    return BUILD["counting"](COCO_CLASSES[rng.choice(len(COCO_CLASSES))], int(rng.integers(2, 4, endpoint=True)))


def draw_colors(rng):
    cls = COCO_CLASSES[(rng.choice(len(COCO_CLASSES) - 1) + 1 + PERSON) % len(COCO_CLASSES)]  # any class but person
    return BUILD["colors"](cls, COLORS[rng.choice(len(COLORS))])


def draw_position(rng):
    a, b = rng.choice(len(COCO_CLASSES), size=2, replace=False)
    return BUILD["position"](COCO_CLASSES[a], COCO_CLASSES[b], POSITIONS[rng.choice(len(POSITIONS))])


def draw_color_attr(rng):
    a, b = (rng.choice(len(COCO_CLASSES) - 1, size=2, replace=False) + 1 + PERSON) % len(COCO_CLASSES)
    ca, cb = rng.choice(len(COLORS), size=2, replace=False)
    return BUILD["color_attr"](COCO_CLASSES[a], COCO_CLASSES[b], COLORS[ca], COLORS[cb])


DRAWS = (draw_two_object, draw_counting, draw_colors, draw_position, draw_color_attr)


def benchmark(seed=BENCHMARK_SEED, draws=BENCHMARK_DRAWS):
    """GenEval's test prompts: its draws in its order, the first of each repeated prompt kept."""
    rng = np.random.default_rng(seed)
    metas = [metadata("single_object", include(COCO_CLASSES[i])) for i in
             rng.choice(len(COCO_CLASSES), size=len(COCO_CLASSES), replace=False)]
    metas += [draw(rng) for draw in DRAWS for _ in range(draws)]
    return list(dict.fromkeys(m["prompt"] for m in metas))


def every_prompt(tag):
    """All of a tag's prompts in GenEval's grammar, in a fixed order, each as the arguments of BUILD[tag]."""
    colorable = [c for c in COCO_CLASSES if c != "person"]
    pairs = lambda names: [(a, b) for a, b in itertools.product(names, repeat=2) if a != b]
    return {"two_object": pairs(COCO_CLASSES),
            "counting": list(itertools.product(COCO_CLASSES, sorted(NUMBERS.values()))),
            "colors": list(itertools.product(colorable, COLORS)),
            "position": [(a, b, rel) for a, b in pairs(COCO_CLASSES) for rel in POSITIONS],
            "color_attr": [(a, b, ca, cb) for a, b in pairs(colorable) for ca, cb in itertools.permutations(COLORS, 2)],
            }[tag]


def same_prompt_key(meta):
    """Prompts with equal keys are the same prompt for the train / test split: pairs compare in either order."""
    if meta["tag"] in ("two_object", "position", "color_attr"):
        return meta["tag"], frozenset((r["class"], r.get("color")) for r in meta["include"])
    return meta["prompt"]


def training(test, seed=TRAIN_SEED, per_tag=PER_TAG):
    """PER_TAG training lines of each tag but single_object, none the same prompt as a test prompt (see above)."""
    rng = np.random.default_rng(seed)
    taken = {same_prompt_key(parse_prompt(p)) for p in test}
    lines = []
    for tag in TAGS[1:]:
        space = every_prompt(tag)
        chosen = {}
        for i in rng.permutation(len(space)):
            meta = BUILD[tag](*space[i])
            key = same_prompt_key(meta)
            if key not in taken and key not in chosen:
                chosen[key] = meta["prompt"]
                if len(chosen) == per_tag:
                    break
        distinct = list(chosen.values())
        lines += [distinct[j % len(distinct)] for j in range(per_tag)]
    return [lines[i] for i in rng.permutation(len(lines))]


def prompt_sets():
    """{"test": the benchmark's prompts, "train": the training prompts}, each a list of lines."""
    test = benchmark()
    return {"test": test, "train": training(test)}


def main(argv=None):
    p = gdro.Parser(description="Write GenEval's test prompts and the training prompts (GenEval's recipe).")
    p.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = p.parse_args(argv)
    for split, lines in prompt_sets().items():
        path = ROOT / FILES[split]
        text = "\n".join(lines) + "\n"
        if args.check:
            if not (path.is_file() and path.read_text(encoding="utf-8") == text):
                raise SystemExit(f"error: {path.name} is not what the recipe makes; rerun python -m "
                                 f"experiments.geneval_prompts to rewrite it")
            print(f"{path.name}: as the recipe makes it")
        else:
            path.write_text(text, encoding="utf-8")
            tags = [parse_prompt(line)["tag"] for line in lines]
            counts = ", ".join(f"{t} {tags.count(t)}" for t in TAGS)
            print(f"{path.name}: {len(lines)} lines, {len(set(lines))} distinct ({counts})")


if __name__ == "__main__":
    gdro.cli(main)
