"""A cheap, prompt-dependent toy reward for CPU experiments, and the example of a custom reward.

gdro.py takes any `fn(images, prompts) -> list[float]` through `--reward FILE.py:FUNCTION`:

    printf 'red sky\\ngreen wall\\nblue car\\n' > colours.txt
    python gdro.py --tiny --prompts colours.txt --reward experiments/toy_reward.py:colour_reward

The prompt names one colour (red, green or blue) and the reward is how much that colour dominates the
image: the mean of its RGB channel minus the mean of the two other channels, pixels in [0, 1], times
SCALE. A prompt naming several colours is scored on the first one it names; a prompt naming none
scores 0. The tiny random model draws images whose colour balance varies a little from seed to seed,
so a group of images has a spread of rewards that GDRO can learn from, and which colour pays
depends on the prompt.
"""
import re

import numpy as np

COLOURS = {"red": 0, "green": 1, "blue": 2}  # colour word -> RGB channel
SCALE = 10.0  # the tiny model's group spread becomes ~0.1, the scale of OCR rewards that the paper's tau = 0.05 fits
_WORD = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)


def target_colour(prompt):
    """The first colour word of the prompt (lower case), or None."""
    m = _WORD.search(prompt)
    return m.group(1).lower() if m else None


def colour_score(image, colour):
    """SCALE * (mean of the colour's channel - mean of the other two channels) of one PIL image."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    means = rgb.reshape(-1, 3).mean(0)
    c = COLOURS[colour]
    return float(SCALE * (means[c] - np.delete(means, c).mean()))


def colour_reward(images, prompts):
    """GDRO reward hook: one float per (image, prompt) pair."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = []
    for image, prompt in zip(images, prompts):
        colour = target_colour(prompt)
        out.append(0.0 if colour is None else colour_score(image, colour))
    return out
