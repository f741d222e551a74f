"""OCR reward for text rendering (the rule of the Flow-GRPO family, run with EasyOCR).

The prompt names a target text in double quotes, e.g. `A neon sign that reads "Open Late"`.
EasyOCR reads the image; all recognised pieces are joined with no separator. Both strings are
lower-cased and stripped of whitespace, then

    dist   = 0 if target is a substring of recognised, else min(Levenshtein(recognised, target), len(target))
    reward = 1 - dist / len(target)          (in [0, 1]; an image on which OCR fails scores 0)

Use `OcrReward()(images, prompts)` for a batch, or the CLI:

    python reward_ocr.py IMAGE.png 'A mug that says "Coffee First"'
    python reward_ocr.py --dir FOLDER --prompts ocr_test.txt
"""

import argparse
import contextlib
import os
import re
import sys
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Opening quote, shortest text, closing quote; straight or curly quotes in any mix.
_QUOTED = re.compile(r'["\u201c](.*?)["\u201d]', re.DOTALL)


def ocr_target(prompt):
    """The text inside the first pair of double quotes of the prompt (straight or curly)."""
    m = _QUOTED.search(prompt)
    if m is None or not m.group(1).strip():
        raise ValueError(f"no quoted target text in prompt: {prompt!r}")
    return m.group(1)


def has_ocr_target(prompt):
    """Whether the prompt quotes a target text (the OCR reward needs one)."""
    return bool((m := _QUOTED.search(prompt)) and m.group(1).strip())


def bad_prompt_lines(lines):
    """A prompt file's [(line number, prompt)] without a quoted target, said in one line; None if every one has one."""
    bad = [str(i) for i, prompt in lines if not has_ocr_target(prompt)]
    return f"line(s) {', '.join(bad[:20])} have no quoted text for the OCR reward" if bad else None


def _normalise(text):
    return "".join(text.lower().split())


def levenshtein(a, b):
    """Edit distance (insert, delete, substitute all cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a  # keep the rows as short as the shorter string
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognized, target):
    """Reward in [0, 1] of recognised text against the target (see the module docstring)."""
    rec, tgt = _normalise(recognized), _normalise(target)
    if not tgt:
        raise ValueError(f"empty OCR target: {target!r}")
    # Extra text around a correct rendering is not penalised (substring = perfect).
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


def _to_array(image):
    """PIL image or HxWx3 uint8 array -> HxWx3 uint8 RGB array (what EasyOCR's readtext takes)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image
    raise TypeError(f"expected a PIL image or an HxWx3 uint8 array, got {type(image).__name__} "
                    f"{getattr(image, 'shape', '')}")


class OcrReward:
    """Callable OCR reward: `OcrReward()(images, prompts) -> list[float]`. Loads EasyOCR once."""

    def __init__(self, device=None):
        import easyocr  # imported here so ocr_score / ocr_target / CLI input checks stay light
        import torch

        if device is None:  # this process's GPU (under torchrun, each process has its own)
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = str(device)
        try:  # offline weights packaged for pip; otherwise EasyOCR downloads to ~/.EasyOCR
            import easyocr_en_models
            kwargs = dict(model_storage_directory=easyocr_en_models.model_dir(), download_enabled=False)
            source = "easyocr_en_models package (offline)"
        except ImportError:
            kwargs, source = {}, "EasyOCR's own download (~/.EasyOCR)"
        print(f"OcrReward: EasyOCR English reader on {self.device}, weights from {source}", file=sys.stderr)
        with _quiet():
            # gpu takes a device string too; "cpu" also makes EasyOCR quantise its models (faster on CPU).
            self.reader = easyocr.Reader(["en"], gpu=self.device, verbose=False, **kwargs)
        for name in ("detector", "recognizer"):  # EasyOCR wraps its nets in DataParallel over EVERY visible GPU, which
            net = getattr(self.reader, name)     # fails off cuda:0 under torchrun: one process, one GPU, its own nets
            if isinstance(net, torch.nn.DataParallel):
                setattr(self.reader, name, net.module)

    def read(self, image):
        """All text EasyOCR recognises in the image, pieces joined with no separator."""
        with _quiet():
            pieces = self.reader.readtext(_to_array(image), detail=0)
        return "".join(pieces)

    def __call__(self, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        # Bad prompts or image types are caller bugs: fail loudly before any OCR runs.
        targets = [ocr_target(p) for p in prompts]
        arrays = [_to_array(im) for im in images]
        rewards = []
        for i, (array, target) in enumerate(zip(arrays, targets)):
            try:
                text = self.read(array)
            except Exception as e:  # noqa: BLE001 -- one broken image must not stop a training batch
                warnings.warn(f"OCR failed on image {i} ({type(e).__name__}: {e}); scoring it 0.0")
                rewards.append(0.0)
                continue
            rewards.append(ocr_score(text, target))
        return rewards


@contextlib.contextmanager
def _quiet():
    """Hide the torch warnings EasyOCR triggers on CPU (deprecated quantisation, pin_memory)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantiz")
        warnings.filterwarnings("ignore", message=r".*pin_memory")
        yield


def render_text(text, size=512):
    """Dark text, as large as fits, centred on a white size x size image; long texts take two lines."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def fit(layout):  # largest font (up to size/5) whose text box fits 90% of the width
        for font_size in range(size // 5, 7, -2):
            font = ImageFont.load_default(size=font_size)
            box = draw.multiline_textbbox((0, 0), layout, font=font, align="center")
            if box[2] - box[0] <= 0.9 * size:
                break
        return font_size, font, box, layout

    best = fit(text)
    words = text.split()
    if best[0] < size // 10 and len(words) > 1:  # small on one line: try the most balanced 2-line split
        k = min(range(1, len(words)), key=lambda k: abs(len(" ".join(words[:k])) - len(" ".join(words[k:]))))
        best = max(best, fit(" ".join(words[:k]) + "\n" + " ".join(words[k:])), key=lambda b: b[0])
    _, font, box, layout = best
    xy = ((size - (box[2] - box[0])) / 2 - box[0], (size - (box[3] - box[1])) / 2 - box[1])
    draw.multiline_text(xy, layout, font=font, fill=(20, 20, 20), align="center")
    return img


def selfcheck(prompts, n=50, reward=None):
    """Sanity check of the reward on clean renderings of the first n prompts' targets.

    Returns (matched, mismatched): the mean reward of each image against its own prompt (should be
    near 1) and against the next prompt's target, the list rotated by one (should be low).
    """
    reward = reward or OcrReward()
    targets = [ocr_target(p) for p in prompts[:n]]
    texts = [reward.read(render_text(t)) for t in targets]
    matched = [ocr_score(x, t) for x, t in zip(texts, targets)]
    rotated = targets[1:] + targets[:1]
    mismatched = [ocr_score(x, t) for x, t in zip(texts, rotated)]
    return sum(matched) / len(matched), sum(mismatched) / len(mismatched)


class Refused(Exception):
    """A bad input of the command line: printed as one line, exit code 2 (gdro.py's convention; this file stays free
    of gdro, so that gdro.py can import it)."""


def main(argv=None):
    """Score one image: python reward_ocr.py IMAGE PROMPT (a folder of images: eval.py --images DIR)."""
    parser = argparse.ArgumentParser(description="Score one image with the OCR reward (EasyOCR); a folder of images "
                                                 "against a prompts file: eval.py --images DIR --prompts FILE.")
    parser.add_argument("image", help="the image file")
    parser.add_argument("prompt", help="its prompt, with the target text in double quotes")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.image):
        raise Refused(f"image not found: {args.image}")
    try:
        target = ocr_target(args.prompt)
        image = Image.open(args.image)
        image.load()
    except (ValueError, OSError) as e:
        raise Refused(str(e))
    text = OcrReward(args.device).read(image)
    print(f"recognised: {text!r}")
    print(f"target: {target!r}  score: {ocr_score(text, target):.4f}")


if __name__ == "__main__":
    try:
        main()
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
