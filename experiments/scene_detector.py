"""A plain detector for the scene model's images (experiments/scene_model.py), and GenEval's reward on it.

The scene model draws a few COCO classes as flat shapes of flat colours on a plain background, so a detector needs
no learning: the background is the image's median colour, an object is a connected component of the pixels far from
it, its class the shape prototype nearest to its mask's shape (how much of its box it fills, its width over its
height, where its mass sits between its top and bottom), its score how close it is to that prototype, and its colour
the nearest of GenEval's ten to its most saturated pixels. Its detections are score_detections' dicts (label,
score, box in pixels, color), so reward_geneval's rules score them as they score Mask2Former's and CLIP's:

    scene_reward(images, prompts) -> list[float]      # gdro.py --reward experiments/scene_detector.py:scene_reward
    scene_evaluate(images, prompts) -> list[dict]     # reward_geneval.explain's verdict of each image
"""
import math

import numpy as np
from PIL import Image

import reward_geneval

# The classes, each drawn as one shape. A mask's shape is three features: how much of its box it fills, the log of
# its width over its height, and where its mass sits between its top (0) and bottom (1). Each class's PROTOTYPE and
# SPREAD: the features' medians and standard deviations over renders passed through the scene model's VAE (2 of each
# prompt; a bar is 2 latent pixels high, so its features vary most). TOLERANCE: how far a drawn shape may stray,
# feature by feature, and still be an object of its class: the renders' spreads would refuse nearly every shape a
# model draws (a circle 15 % wider than high, a square with a rounded corner), so at least these
SHAPES = {"clock": "circle", "tv": "square", "kite": "triangle", "bus": "bar"}
PROTOTYPES = {"clock": (0.79, 0.0, 0.505), "tv": (0.96, 0.0, 0.50), "kite": (0.595, 0.12, 0.627),
              "bus": (0.967, 1.02, 0.50)}
SPREAD = {"clock": (0.03, 0.037, 0.013), "tv": (0.034, 0.045, 0.011), "kite": (0.031, 0.04, 0.017),
          "bus": (0.042, 0.059, 0.018)}
TOLERANCE = {c: tuple(max(s, t) for s, t in zip(spread, (0.06, 0.15, 0.04))) for c, spread in SPREAD.items()}
TYPICAL = 4.0  # a shape within 4 spreads of its prototype is typical of its class
# GenEval's ten colours as the renderer paints them; the detector names the nearest (white is the background's)
RGB = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 210, 20), "green": (30, 160, 50),
       "blue": (30, 70, 220), "purple": (140, 50, 190), "pink": (245, 140, 190), "brown": (120, 70, 30),
       "black": (25, 25, 25), "white": (250, 250, 250)}
FOREGROUND = 100  # a pixel is an object's when a channel differs from the background by more (about half a colour's)
MIN_AREA = 24     # smaller components are specks, not objects (the smallest render covers about 90 pixels)


def features(mask):
    """(fill, log aspect, centroid height) of one component's bool mask, and its box [x0, y0, x1, y1] (pixel edges)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    return (len(ys) / (w * h), math.log(w / h), (ys.mean() + 0.5 - y0) / h), [float(x0), float(y0), float(x1),
                                                                              float(y1)]


def distance(feature, label, units):
    return math.sqrt(sum(((f - p) / u) ** 2 for f, p, u in zip(feature, PROTOTYPES[label], units[label])))


def classify(feature):
    """(the nearest prototype's class, its score): the class's share of the prototypes' Gaussian likelihoods (in
    SPREAD units; near 1 unless the shape lies between two classes, 0.5 halfway) times how typical the shape is of
    it (1 within TYPICAL tolerances of the prototype, falling as a Gaussian beyond: a merged blob or a smear scores
    low)."""
    dist = {c: distance(feature, c, SPREAD) for c in PROTOTYPES}
    label = min(dist, key=dist.get)
    share = 1 / sum(math.exp((dist[label] ** 2 - d ** 2) / 2) for d in dist.values())
    return label, share * math.exp(-max(0.0, distance(feature, label, TOLERANCE) - TYPICAL) ** 2 / 2)


def colour_name(pixels):
    """The nearest of GenEval's ten colours (RGB Euclidean) to the mean of [N, 3] pixels."""
    mean = pixels.mean(0)
    return min(RGB, key=lambda c: sum((m - v) ** 2 for m, v in zip(mean, RGB[c])))


def detect(image):
    """One image's detections: dicts with "label" (a class of SHAPES), "score", "box" (pixels) and "color"."""
    from scipy import ndimage
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    background = np.median(pixels.reshape(-1, 3), axis=0)  # a plain background covers most of every scene
    deviation = np.abs(pixels - background).max(-1)
    labels, n = ndimage.label(deviation > FOREGROUND)  # 4-connected: shapes that only touch at a corner stay two
    found = []
    for k in range(1, n + 1):
        mask = labels == k
        if mask.sum() < MIN_AREA:
            continue
        feature, box = features(mask)
        label, score = classify(feature)
        # the colour from the component's inner half: its edge pixels are blended with the background
        inner = mask & (deviation >= np.median(deviation[mask]))
        found.append({"label": label, "score": score, "box": box, "color": colour_name(pixels[inner])})
    return found


def scene_evaluate(images, prompts):
    """reward_geneval.explain's verdict of each image on its prompt: correct, reward, tag, failed, detections."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return [reward_geneval.explain(p, detect(im)) for im, p in zip(images, prompts)]


def scene_reward(images, prompts):
    """GenEval's reward of each image (gdro.py / eval.py --reward experiments/scene_detector.py:scene_reward)."""
    return [v["reward"] for v in scene_evaluate(images, prompts)]
