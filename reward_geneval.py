"""GenEval reward: GenEval's rules (Ghosh et al. 2023) on Mask2Former and CLIP, in process through transformers.

A GenEval prompt is written in a fixed grammar, so its requirements are read from its text (`parse_prompt`):

    a photo of a/an X                     single_object  X present
    a photo of a/an X and a/an Y          two_object     X and Y present
    a photo of two/three/four Xs          counting       n of X, and not n + 1 (plural: "es" after a final "s")
    a photo of a/an C X                   colors         X present, and it is C
    a photo of a/an X R a/an Y            position       Y present, X present and R of it (left of, right of, ...)
    a photo of a/an C1 X and a/an C2 Y    color_attr     X is C1 and Y is C2

X and Y are among GenEval's 80 COCO class names, C among its ten colours; "person" is never coloured. A Mask2Former
(COCO instance segmentation) finds the objects, CLIP ViT-L/14 names each checked object's colour from its mask on
grey, and `score_detections(prompt, detections) -> (correct, reward)` applies GenEval's rules (the benchmark's 0/1)
and the training reward: the mean of the prompt's checks, with partial credit, which is 1 exactly when correct.

    GenevalReward()(images, prompts) -> list[float]        # the reward gdro.py trains on
    GenevalReward().evaluate(images, prompts) -> list[dict] # per image: correct, reward, tag, failed, detections

    python reward_geneval.py IMAGE.png "a photo of a dog left of a cat"
    python reward_geneval.py --dir FOLDER --prompts geneval_test.txt    # k images per prompt, in name order
"""

import argparse
import math
import re

from PIL import Image

# GenEval's class names (its object_names.txt), in COCO's label order.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # the benchmark's order
NUMBERS = {"two": 2, "three": 3, "four": 4}
POSITIONS = ("left of", "right of", "above", "below")

THRESHOLD = 0.3           # a detection counts when its score is above this (strictly, as GenEval's code compares)
COUNTING_THRESHOLD = 0.9  # ... or above this for a counting prompt, where a doubtful extra object would fail it
MAX_OBJECTS = 16          # per class, highest scores first
POSITION_MARGIN = 0.1     # of the two boxes' summed sides, taken off the centre offset before judging a relation

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
FLAGS = {"detector": "--geneval-detector", "clip": "--geneval-clip"}  # how gdro.py, eval.py and main() name them
COLOR_TEMPLATES = ("a photo of a {c} {x}", "a photo of a {c}-colored {x}", "a photo of a {c} object")
GREY = (153, 153, 153)  # #999: the background GenEval pastes each object's mask on before naming its colour
DETECTOR_SIZE = (800, 1333)  # COCO's test resize (shortest, longest side): GenEval's mmdet config resizes so
# COCO names some detectors' configs use, as GenEval writes them
DETECTOR_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}

_PREFIX = "a photo of "
_POSITION = re.compile(rf"(.+) ({'|'.join(POSITIONS)}) (.+)")
_CLASSES = set(COCO_CLASSES)


def article(word):
    """GenEval's article: "an" before a vowel letter, else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def plural(name):
    """GenEval's plural: "es" after a final "s" ("buses", "skises"), else "s" ("sheeps")."""
    return name + ("es" if name.endswith("s") else "s")


_SINGULAR = {plural(c): c for c in COCO_CLASSES}


def _phrase(text):
    """'a red car' -> ('car', 'red'); 'an apple' -> ('apple', None). ValueError outside GenEval's grammar."""
    art, _, rest = text.partition(" ")
    if art not in ("a", "an"):
        raise ValueError(f"{text!r}: expected 'a' or 'an' and an object, or a count (two, three, four)")
    color, cls = (None, rest) if rest in _CLASSES else rest.partition(" ")[::2]
    if cls not in _CLASSES or (color is not None and color not in COLORS):
        raise ValueError(f"{rest!r} is not one of the 80 COCO classes, nor a colour and one")
    if color and cls == "person":
        raise ValueError("GenEval never colours a person")
    if art != article(color or cls):
        raise ValueError(f"{text!r}: GenEval writes {article(color or cls)!r} before {color or cls!r}")
    return cls, color


def include(cls, color=None, count=1, position=None):
    """One requirement of GenEval's metadata: count of class, with a colour or a (relation, include index)."""
    return {"class": cls, "count": count, **({"color": color} if color else {}),
            **({"position": position} if position else {})}


def parse_prompt(prompt):
    """A GenEval prompt -> its metadata, as GenEval's evaluation_metadata.jsonl writes it:
    {"tag": one of TAGS, "include": [{"class", "count", ["color"], ["position": (relation, include index)]}, ...],
     ["exclude": [{"class", "count"}] (counting only),] "prompt": prompt}. ValueError, with the reason, otherwise."""
    if not isinstance(prompt, str) or not prompt.startswith(_PREFIX):
        raise ValueError(f"GenEval's prompts start with {_PREFIX.strip()!r}: {prompt!r}")
    body = prompt[len(_PREFIX):]
    number, _, rest = body.partition(" ")
    if number in NUMBERS:
        if rest not in _SINGULAR:
            raise ValueError(f"{rest!r} is not GenEval's plural of one of the 80 COCO classes")
        n, cls = NUMBERS[number], _SINGULAR[rest]
        return {"tag": "counting", "include": [include(cls, count=n)], "exclude": [{"class": cls, "count": n + 1}],
                "prompt": prompt}
    if m := _POSITION.fullmatch(body):
        (x, cx), (y, cy) = _phrase(m.group(1)), _phrase(m.group(3))
        if cx or cy or x == y:
            raise ValueError(f"a position prompt relates two different objects, uncoloured: {body!r}")
        return {"tag": "position", "include": [include(y), include(x, position=(m.group(2), 0))], "prompt": prompt}
    parts = body.split(" and ")
    if len(parts) > 2:
        raise ValueError(f"GenEval's prompts name at most two objects: {body!r}")
    objects = [_phrase(p) for p in parts]
    if len(objects) == 2 and (objects[0][0] == objects[1][0] or (objects[0][1] is None) != (objects[1][1] is None)):
        raise ValueError(f"two different objects, both coloured or neither: {body!r}")
    tag = {(1, False): "single_object", (1, True): "colors", (2, False): "two_object", (2, True): "color_attr"}[
        len(objects), objects[0][1] is not None]
    return {"tag": tag, "include": [include(cls, color) for cls, color in objects], "prompt": prompt}


def prompt_of(metadata):
    """The inverse of parse_prompt: GenEval's prompt text for a tag and its includes."""
    inc = metadata["include"]

    def phrase(req):  # "a red car", "an apple"
        words = " ".join(filter(None, (req.get("color"), req["class"])))
        return f"{article(words)} {words}"

    if metadata["tag"] == "counting":
        number = {n: w for w, n in NUMBERS.items()}[inc[0]["count"]]
        return f"{_PREFIX}{number} {plural(inc[0]['class'])}"
    if metadata["tag"] == "position":
        return f"{_PREFIX}{phrase(inc[1])} {inc[1]['position'][0]} {phrase(inc[0])}"
    return _PREFIX + " and ".join(phrase(r) for r in inc)


def check_prompts(prompts):
    """[(index in prompts, reason), ...] for every prompt parse_prompt refuses; [] when all are GenEval's."""
    bad = []
    for i, prompt in enumerate(prompts):
        try:
            parse_prompt(prompt)
        except ValueError as e:
            bad.append((i, str(e)))
    return bad


def bad_prompt_lines(lines):
    """A prompt file's [(line number, prompt)] outside GenEval's grammar, said in one line; None if all are in it."""
    bad = check_prompts([prompt for _, prompt in lines])
    if bad:
        return (f"line {lines[bad[0][0]][0]} is not a GenEval prompt ({bad[0][1]})"
                + (f"; {len(bad) - 1} more lines too" if len(bad) > 1 else ""))
    return None


def relation(box_a, box_b):
    """GenEval's relations of box A to box B, a subset of POSITIONS; boxes [x0, y0, x1, y1] in pixels, y down.
    Each axis' centre offset shrinks by POSITION_MARGIN of the two boxes' summed sides; a relation holds when its
    shrunk component is over half the full offset's length (within 60 degrees of the axis after the shrink)."""
    offset = [(box_a[i] + box_a[i + 2] - box_b[i] - box_b[i + 2]) / 2 for i in (0, 1)]
    sides = [abs(box_a[i + 2] - box_a[i]) + abs(box_b[i + 2] - box_b[i]) for i in (0, 1)]
    shrunk = [max(abs(o) - POSITION_MARGIN * s, 0) * ((o > 0) - (o < 0)) for o, s in zip(offset, sides)]
    if all(abs(r) < 1e-3 for r in shrunk):
        return set()
    dx, dy = (r / math.hypot(*offset) for r in shrunk)
    return {rel for rel, holds in zip(POSITIONS, (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)) if holds}


def keep(detections, threshold):
    """{class: its detections scored above threshold, highest first, at most MAX_OBJECTS} (classes with none left out).
    detections: dicts with "label" (a COCO class) and "score" (any other keys ride along)."""
    kept = {}
    for d in sorted(detections, key=lambda d: -d["score"]):
        group = kept.setdefault(d["label"], [])
        if d["score"] > threshold and len(group) < MAX_OBJECTS:
            group.append(d)
    return {cls: group for cls, group in kept.items() if group}


def explain(prompt, detections):
    """GenEval's verdict on one image: {"correct": bool, "reward": float in [0, 1], "tag", "failed": "" or the failed
    checks ("missing cat; colour: red car is blue"), "detections": the kept ones, by class, highest first}.
    prompt: its text or parse_prompt's metadata; detections: dicts with "label", "score", "box" [x0, y0, x1, y1] in
    pixels and "color" (one of COLORS or None; read only for a colour check).
    An include of n of X is met when n are kept; its colour and position are checked on the top n. The reward is the
    mean of the checks: per include min(kept, n) / n, with a colour (those of the top n that have it) / n, with a
    position 1 when it is met, in its relation to each of the target include's top objects and that include met;
    per exclude 1 when fewer than its count are kept."""
    meta = prompt if isinstance(prompt, dict) else parse_prompt(prompt)
    kept = keep(detections, COUNTING_THRESHOLD if meta["tag"] == "counting" else THRESHOLD)
    credits, failed, met_groups = [], [], []
    for req in meta["include"]:
        cls, n = req["class"], req["count"]
        top = kept.get(cls, [])[:n]
        met = len(top) == n
        credits.append(len(top) / n)
        if not met:
            failed.append(f"count {len(top)}/{n} {cls}" if top else f"missing {cls}")
        if "color" in req:
            wrong = [d.get("color") or "unnamed" for d in top if d.get("color") != req["color"]]
            credits.append((len(top) - len(wrong)) / n)
            met = met and not wrong
            if wrong:
                failed.append(f"colour: {req['color']} {cls} is {', '.join(wrong)}")
        if "position" in req:
            rel, target = req["position"]
            targets = met_groups[target]  # None: the target include is not met
            holds = met and targets is not None and all(rel in relation(d["box"], t["box"])
                                                        for d in top for t in targets)
            credits.append(float(holds))
            if met and targets is not None and not holds:  # else the count or the target already says why
                failed.append(f"position: {cls} not {rel} {meta['include'][target]['class']}")
            met = holds
        met_groups.append(top if met else None)
    for req in meta.get("exclude", []):
        found = len(kept.get(req["class"], []))
        credits.append(float(found < req["count"]))
        if found >= req["count"]:
            failed.append(f"exclude: {found} {plural(req['class'])}")
    return {"correct": all(c == 1 for c in credits), "reward": sum(credits) / len(credits), "tag": meta["tag"],
            "failed": "; ".join(failed), "detections": [d for group in kept.values() for d in group]}


def score_detections(prompt, detections):
    """(correct: GenEval's 0/1 as a bool, reward: the training reward in [0, 1]) of one image; see explain."""
    verdict = explain(prompt, detections)
    return verdict["correct"], verdict["reward"]


# ----------------------------------------------------------------------------- the detector and the colour classifier

def mask_boxes(masks):
    """[N, H, W] bool masks -> [N, 4] float boxes [x0, y0, x1, y1]: the pixel edges around each mask (mmdet's
    convention: x1 = last column + 1); an empty mask's box is zeros."""
    import torch

    def edges(hit):  # [N, L] bool -> first index, last index + 1 (0, 0 when none)
        idx = torch.arange(hit.shape[1], device=hit.device)
        first = torch.where(hit, idx, hit.shape[1]).min(1).values
        last = torch.where(hit, idx + 1, 0).max(1).values
        return torch.where(hit.any(1), first, 0), last

    (x0, x1), (y0, y1) = edges(masks.any(1)), edges(masks.any(2))
    return torch.stack([x0, y0, x1, y1], 1).float()


def detector_classes(id2label):
    """The detector's label ids -> GenEval's class names (None: not one of the 80, such as a panoptic stuff class)."""
    names = {int(i): DETECTOR_ALIASES.get(n.lower(), n.lower()) for i, n in id2label.items()}
    classes = {i: n if n in _CLASSES else None for i, n in names.items()}
    if missing := _CLASSES - set(classes.values()):
        raise ValueError(f"the detector's labels are not COCO's 80 classes (no {', '.join(sorted(missing)[:3])}...)")
    return classes


def colour_crop(image, mask, box):
    """GenEval's colour input: the object's pixels (mask: HxW bool array) on #999 grey, cropped to its box."""
    grey = Image.new("RGB", image.size, GREY)
    return Image.composite(image, grey, Image.fromarray(mask)).crop(tuple(int(v) for v in box))


def _load(cls, source, what, **kwargs):
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot load the GenEval {what} {source!r} ({str(e).strip().splitlines()[0]}); "
                         f"download it once, or give a local folder: {FLAGS[what]} DIR") from None


class GenevalReward:
    """`GenevalReward()(images, prompts) -> list[float]`: the training reward of each image (PIL or HxWx3 uint8).
    detector / clip: hub ids or local folders (a Mask2Former for COCO instances, a CLIP); loaded once, fp16 on CUDA;
    batch: images per detector forward; side: the detector's input's shortest side (COCO's ratio to the longest)."""

    def __init__(self, detector=None, clip=None, device=None, batch=8, side=DETECTOR_SIZE[0]):
        import torch
        from transformers import CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation
        from transformers import Mask2FormerImageProcessor

        detector, clip = detector or DEFAULT_DETECTOR, clip or DEFAULT_CLIP  # None: GenEval's own

        if device is None:  # this process's GPU (under torchrun, each process has its own)
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device, self.batch = torch.device(device), batch
        self.size = {"shortest_edge": side, "longest_edge": round(side * DETECTOR_SIZE[1] / DETECTOR_SIZE[0])}
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.detector = _load(Mask2FormerForUniversalSegmentation, detector, "detector", dtype=self.dtype)
        self.detector.to(self.device).eval()
        self.detector_processor = _load(Mask2FormerImageProcessor, detector, "detector")
        self.clip = _load(CLIPModel, clip, "clip", dtype=self.dtype).to(self.device).eval()
        self.clip_processor = _load(CLIPProcessor, clip, "clip")
        try:
            self.classes = detector_classes(self.detector.config.id2label)
        except ValueError as e:
            raise SystemExit(f"error: {FLAGS['detector']} {detector}: {e}") from None
        self._colour_text = {}  # class -> [10, D] unit colour embeddings (its three templates averaged)

    def detect(self, images):
        """Per image (PIL RGB), its detections of the 80 classes scored at least THRESHOLD: dicts with "label",
        "score", "box" (four floats, pixels) and "mask" (HxW bool tensor); keep applies GenEval's thresholds."""
        import torch

        found = []
        for i in range(0, len(images), self.batch):
            chunk = images[i:i + self.batch]
            inputs = self.detector_processor(images=chunk, size=self.size, return_tensors="pt")
            with torch.no_grad():
                out = self.detector(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                                    pixel_mask=inputs["pixel_mask"].to(self.device))
            out.class_queries_logits, out.masks_queries_logits = (out.class_queries_logits.float(),
                                                                  out.masks_queries_logits.float())
            # GenEval's lower threshold, not the processor's 0.5, so that keep's decide (the processor compares >=,
            # keep >); a lower one would change nothing but hold up to 100 full-size masks per image
            results = self.detector_processor.post_process_instance_segmentation(
                out, threshold=THRESHOLD, target_sizes=[im.size[::-1] for im in chunk], return_binary_maps=True)
            for result in results:
                info = result["segments_info"]
                masks = result["segmentation"].bool() if info else torch.zeros(0, 1, 1, dtype=torch.bool)
                boxes = mask_boxes(masks).tolist()
                found.append([{"label": self.classes[s["label_id"]], "score": s["score"], "box": box, "mask": mask}
                              for s, box, mask in zip(info, boxes, masks) if self.classes.get(s["label_id"])])
        return found

    def colours(self, crops, classes):
        """CLIP's zero-shot colour (one of COLORS) of each crop, as an object of its class; lists of equal length."""
        import torch

        with torch.no_grad():
            for cls in set(classes) - set(self._colour_text):
                texts = [t.format(c=c, x=cls) for c in COLORS for t in COLOR_TEMPLATES]
                tokens = self.clip_processor(text=texts, padding=True, return_tensors="pt").to(self.device)
                emb = _unit(self.clip.get_text_features(**tokens).pooler_output.float())
                self._colour_text[cls] = _unit(emb.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1))
            if not crops:
                return []
            pixels = self.clip_processor(images=crops, return_tensors="pt")["pixel_values"]
            image = _unit(self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
                          .pooler_output.float())
            text = torch.stack([self._colour_text[cls] for cls in classes])  # [N, 10, D]
            return [COLORS[k] for k in torch.einsum("nd,ncd->nc", image, text).argmax(1).tolist()]

    def evaluate(self, images, prompts):
        """Per image, explain's dict: correct, reward, tag, failed and its kept detections (label, score, box,
        color; the colour named only where the prompt checks one)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        metas = [parse_prompt(p) for p in prompts]  # a bad prompt is the caller's bug: fail before any model runs
        images = [_to_pil(im) for im in images]
        kept = []
        for meta, dets in zip(metas, self.detect(images)):
            kept.append(keep(dets, COUNTING_THRESHOLD if meta["tag"] == "counting" else THRESHOLD))
        asked = [(i, d, req["class"]) for i, meta in enumerate(metas) for req in meta["include"] if "color" in req
                 for d in kept[i].get(req["class"], [])[:req["count"]]]
        named = self.colours([colour_crop(images[i], d["mask"].cpu().numpy(), d["box"]) for i, d, _ in asked],
                             [cls for _, _, cls in asked])
        for (_, d, _), colour in zip(asked, named):
            d["color"] = colour
        plain = lambda d: {"label": d["label"], "score": d["score"], "box": d["box"], "color": d.get("color")}
        return [explain(meta, [plain(d) for group in groups.values() for d in group])
                for meta, groups in zip(metas, kept)]

    def __call__(self, images, prompts):
        return [v["reward"] for v in self.evaluate(images, prompts)]


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _to_pil(image):
    import numpy as np

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL image or an HxWx3 uint8 array, got {type(image).__name__}")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    """Score one image: python reward_geneval.py IMAGE PROMPT (a folder: eval.py --images DIR --reward geneval)."""
    parser = argparse.ArgumentParser(description="Score one image with GenEval's rules (Mask2Former + CLIP); a folder "
                                                 "against a prompts file: eval.py --images DIR --reward geneval.")
    parser.add_argument("image", help="the image file")
    parser.add_argument("prompt", help="its GenEval prompt")
    parser.add_argument(FLAGS["detector"], default=DEFAULT_DETECTOR, help="Mask2Former hub id or folder (%(default)s)")
    parser.add_argument(FLAGS["clip"], default=DEFAULT_CLIP, help="CLIP hub id or folder (%(default)s)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    refuse = lambda message: parser.exit(2, f"error: {message}\n")  # bad input: one line, exit 2
    if bad := check_prompts([args.prompt]):
        refuse(f"the prompt is not GenEval's: {bad[0][1]}")
    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as e:
        refuse(f"cannot read image {args.image}: {e}")
    [verdict] = GenevalReward(args.geneval_detector, args.geneval_clip, args.device).evaluate([image], [args.prompt])
    for d in verdict["detections"]:
        print(f"{d['label']:<18} {d['score']:.3f}  box {[round(x) for x in d['box']]}  {d['color'] or ''}")
    print(f"correct: {verdict['correct']}  reward: {verdict['reward']:.4f}  {verdict['failed']}")


if __name__ == "__main__":
    main()
