"""GDRO: Group-level Direct Reward Optimization for rectified-flow text-to-image models, in one file.

Paper: "GDRO: Group-level Reward Post-training Suitable for Diffusion Models" (arXiv 2601.02036).
GDRO trains fully offline, in two phases: (1) the FROZEN base model draws a group of images per prompt once
and an explicit reward scores them once; (2) a LoRA learns to rank each group: at a random noise level the gap
between the policy's and the frozen reference's velocity errors is a DPO-style implicit reward, and a
Plackett-Luce cross-entropy ranks the group by it against a softmax of the explicit rewards (Eqs. 5-9).

This file reads top to bottom:
  1. settings     the paper's defaults as flags, and the constants
  2. the method   sample_t -> velocity -> velocity_errors -> gdro_loss: from cached images to the loss, one
                  block with no other dependency in this file, to read next to the paper or copy elsewhere
     plumbing     plumbing.py: refused inputs, prompt files and image folders, processes (torchrun), crash-safe
                  files, cache shards, checkpoints, one run per folder, signals: what the phases use and a reader of
                  the method need not see
  3. models       the pipelines (or tiny random ones), prompts, samplers, VAE: thin calls to families.py, which
                  holds one record per model family (SD3/SD3.5, FLUX.1, Qwen-Image, FLUX.2 [dev] and [klein], Z-Image)
  4. phase 1      the offline rollout cache (or your own images and scores: --from-images)
  5. phase 2      training: groups drawn in epochs, micro-batches, checkpoints, the loop
  6. main         every input checked before any model loads; then phase 1, phase 2

    python gdro.py --prompts ocr.txt                                  # SD3.5-Medium, the paper's OCR setting
    python gdro.py --prompts ocr.txt --model black-forest-labs/FLUX.1-dev
    python gdro.py --prompts ocr.txt --dry-run                        # the plan and its cost, nothing loaded
    python gdro.py --prompts ocr.txt --tiny                           # tiny random model on CPU, seconds
    torchrun --nproc_per_node=8 gdro.py --prompts ocr.txt             # 8 GPUs, same result as one

Equation numbers "Eq. N" are the paper's; "(m.N)" is item N of the method table in the README.
"""
import argparse
import contextlib
import functools
import gc
import hashlib
import importlib.util
import json
import math
import numbers
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from families import FAMILIES, family_of_hub_id, family_of_pipeline_class, supported
from plumbing import (BadInput, LORA_FILE, SHA256_FILE, append_line, barrier, cache_interrupted, check_cache,
                      check_manifest, check_out, check_run_state, damaged_file, file_sha256, init_distributed,
                      is_main_process, load_checkpoint, lock_out, my_missing_shards, newest_checkpoint,
                      rank_and_world, read_image_folder, read_metrics, read_prompts, read_shard, run_config,
                      save_checkpoint, save_lora, shard_path, shrink_if_tiny, stop_when_done, write_atomic,
                      write_shard)  # also gdro's public names for other scripts

# ============================================================================= 1. settings

# Per family (families.py): the rollouts' usual guidance (CFG, distilled or none), the real models' flow-matching
# schedules (their scheduler_config.json; the tiny pipelines use them too), and the LoRA's modules: the attention
# projections of the image and text streams.
DEFAULT_GUIDANCE = {name: f.guidance for name, f in FAMILIES.items()}
SCHEDULER_CONFIG = {name: f.scheduler for name, f in FAMILIES.items()}
LORA_TARGETS = {name: f.lora_targets for name, f in FAMILIES.items()}
RESOLUTION_FACTOR = 16  # every family: the VAE downsamples 8x and the transformer takes 2x2 patches
PAPER_RESOLUTION = 512  # the paper's image side; a smaller local model (the CPU text model) draws at its own size
# --tiny shrinks the run for a CPU (flags given explicitly win)
TINY_RUN = dict(resolution=64, max_prompts=4, images_per_prompt=8, steps=4, groups_per_step=2,
                max_steps=20, lora_rank=8, log_every=5, save_every=10)
# Measured on one H200 (bf16, 512 px, see README "Memory and cost"): one prompt's rollout group of 16 images with
# 10 Euler steps, and one training step of one k = 6 group with checkpointing: --dry-run's estimate, bench.py's
# baseline.
H200_SECONDS = {"sd3": {"rollout_16x10": 3.39, "group_step": 0.46}, "flux": {"rollout_16x10": 9.00, "group_step": 1.70}}

# --sampler: name -> (diffusers scheduler, its settings), solvers of the same flow-matching ODE. GDRO does not care
# which drew the cache, so a second-order solver is free speed (README "Samplers": distance to a 200-step solution)
SAMPLERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {}),
            "dpm++2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
            "unipc": ("UniPCMultistepScheduler", dict(solver_order=2))}


def image_seed(seed, i, j, n):
    """The seed of image j of prompt i when every prompt has n images: rollouts (and eval) are reproducible image by
    image, whatever the batching or the number of processes."""
    return seed + i * n + j


def add_model_flags(p):
    """The flags gdro.py and eval.py share: the model, the prompts used, how it draws (settle_model fills defaults)."""
    p.add_argument("--model", default="stabilityai/stable-diffusion-3.5-medium",
                   help="hub id or local folder of a supported pipeline (README, docs/models.md) (default: "
                        "%(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random model of the same classes, no download; shrinks the run for CPU")
    p.add_argument("--family", default="sd3", choices=list(FAMILIES),
                   help="model family of --tiny; a real --model says its own (default: %(default)s)")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts (default: all)")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"image side, a multiple of {RESOLUTION_FACTOR} (default: 512, or a smaller model's own)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale or distilled guidance, as the model takes it (default: the family's usual, "
                        "e.g. 4.5 SD3, 3.5 FLUX.1)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GDRO: offline group-level reward post-training of a LoRA.")
    p.add_argument("--prompts", help="text file, one prompt per line (UTF-8)")
    p.add_argument("--from-images", metavar="DIR",
                   help="build the cache from DIR/metadata.jsonl and its images instead of sampling (see README)")
    p.add_argument("--out", default="runs/gdro",
                   help="output folder: cache/, checkpoints/, lora/, metrics.jsonl (default: %(default)s)")
    add_model_flags(p)
    p.add_argument("--reward", default="ocr",
                   help="'ocr' (reward_ocr.py) or FILE.py:FUNCTION: fn(images, prompts) -> list[float] (default: ocr)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (cache, coverage, expected GPU time) as JSON and exit")
    # phase 1: rollout cache
    p.add_argument("--images-per-prompt", type=int, default=16,
                   help="images the frozen base model draws per prompt, once (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="ODE sampler steps per rollout (default: 10, a step-distilled model's own)")
    p.add_argument("--sampler", default="euler", choices=list(SAMPLERS),
                   help="rollout ODE solver (default: %(default)s, the model's own)")
    p.add_argument("--rollout-batch", type=int, default=None,
                   help="images per pipeline call (default: a whole prompt group)")
    # the loss (Eqs. 5-9)
    p.add_argument("--beta", type=float, default=12.0,
                   help="implicit-reward scale, Eq. 5; OCR 12, GenEval 6 (default: %(default)s)")
    p.add_argument("--tau", type=float, default=0.05,
                   help="reward softmax temperature, Eq. 7; 0 = hard ranking, Eq. 12 (default: %(default)s)")
    p.add_argument("--gamma", type=float, default=0.5,
                   help="weight of the top-1 stabiliser, Eq. 8; OCR 0.5, GenEval 1.0 (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=6,
                   help="k: images per group in the loss, drawn from one prompt's cache (default: %(default)s)")
    p.add_argument("--normalize-rewards", action="store_true",
                   help="z-score rewards within each group before /tau (not in the paper)")
    p.add_argument("--uniform-t", action="store_true",
                   help="draw t uniformly instead of the base model's shifted logit-normal")
    # phase 2: training
    p.add_argument("--max-steps", type=int, default=300,
                   help="optimizer steps; the paper's OCR run peaks near 300 (default: %(default)s)")
    p.add_argument("--groups-per-step", type=int, default=8,
                   help="groups per optimizer step, all processes together (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="groups per forward/backward; gradients accumulate to --groups-per-step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, default=32,
                   help="LoRA rank on the transformer's attention projections (default: %(default)s)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (default: on with CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer for rollouts and training (CUDA only)")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between lines of metrics.jsonl (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue training from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of rollouts (see image_seed) and of training's draws (default: %(default)s)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    unused = ("images_per_prompt", "steps") if args.from_images else ()  # an image folder samples nothing
    return shrink_if_tiny(args, argv, {k: v for k, v in TINY_RUN.items() if k not in unused})


# ============================================================================= 2. the method
# Notation (diffusers' rectified flow): x_t = (1 - t) x0 + t eps, target velocity v = eps - x0, t in (0, 1).
# The policy is base + LoRA; the reference is the same transformer with the adapter switched off (no second copy).


def sample_t(n, mu, generator, uniform=False):
    """n noise levels t in (0, 1), drawn as the base model was trained: logit-normal(0, 1), then the sampler's
    exponential shift t -> e^mu / (e^mu + 1/t - 1), so training sees the noise levels the sampler visits. mu: the
    model's shift (schedule_mu: a fixed shift s is mu = log s; with dynamic shifting it grows with the resolution)."""
    u = torch.rand(n, generator=generator) if uniform else torch.sigmoid(torch.randn(n, generator=generator))
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def velocity(transformer, family, x_t, t, cond, guidance=None):
    """v(x_t, t, c): the transformer's velocity prediction. x_t [N, ...] in the cached layout, t [N] in (0, 1),
    cond {name: [N, ...]}; guidance: a distilled guidance the transformer embeds (None for a model without one).
    The family's record (families.py) makes the call: its timestep scale, its sign, its inputs."""
    return FAMILIES[family].velocity(transformer, x_t, t, cond, guidance)


@contextlib.contextmanager
def adapter_disabled(transformer):
    """The reference model: the LoRA switched off for the block (diffusers' PEFT integration)."""
    model = getattr(transformer, "module", transformer)  # under DistributedDataParallel the model is its .module
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


def velocity_errors(transformer, family, x0, cond, t, eps, guidance=None):
    """Per-image velocity errors of the policy and of the frozen reference, on B groups of k cached images.

    x0:   [B, k, ...] clean latents of cached images in the transformer's layout (a grid, or packed tokens), fp32
    cond: {name: [B, ...]} each group's prompt conditioning
    t:    [B] ONE noise level per group;  eps: [B, ...] ONE noise sample per group, shared by its k images, so the
          images of a group differ only in themselves (as in Diffusion-DPO and DGPO)
    Returns (err_policy, err_ref), each [B, k] in fp32: mean over latent elements of (v - v_model)^2 at
    x_t = (1 - t) x0 + t eps, v = eps - x0 (fresh noise over the cached clean latent, the paper's Fig. 2).
    err_ref carries no gradient. At LoRA init (B = 0) the two are exactly equal.
    """
    B, k = x0.shape[:2]
    t_ = t.view(B, 1, *[1] * (x0.dim() - 2))
    eps = eps[:, None]  # broadcast over the group
    x_t = ((1 - t_) * x0 + t_ * eps).flatten(0, 1)
    v = (eps - x0).flatten(0, 1)
    t, cond = t.repeat_interleave(k), {name: c.repeat_interleave(k, 0) for name, c in cond.items()}
    v_policy = velocity(transformer, family, x_t, t, cond, guidance)  # first: the host's adapter switching overlaps it
    with torch.no_grad(), adapter_disabled(transformer):
        v_ref = velocity(transformer, family, x_t, t, cond, guidance)
    err = lambda v_model: (v_model.float() - v).pow(2).flatten(1).mean(1).view(B, k)
    return err(v_policy), err(v_ref)


def gdro_loss(err_policy, err_ref, rewards, beta=12.0, tau=0.05, gamma=0.5, normalize_rewards=False):
    """The GDRO loss (Eq. 9): Plackett-Luce soft cross-entropy over implicit rewards + top-1 stabiliser.

    err_policy: [B, k] per-image velocity error ||v - v_theta||^2 of the policy (mean over latent elements).
    err_ref:    [B, k] the same for the frozen reference; carries no gradient.
    rewards:    [B, k] explicit rewards (e.g. OCR accuracy); images may be in any order within a group.
    beta: implicit-reward scale; tau: reward temperature (0 = hard ranking, Eq. 12); gamma: stabiliser weight.
    normalize_rewards: z-score each group's rewards before /tau (an option; the paper uses raw rewards).
    Returns a scalar: the mean over the B groups.
    """
    order = rewards.argsort(dim=1, descending=True, stable=True)  # sort each group best -> worst: r_1 >= ... >= r_k
    err_policy, err_ref, rewards = (x.gather(1, order) for x in (err_policy, err_ref.detach(), rewards))
    if normalize_rewards:
        rewards = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    s = -beta * (err_policy - err_ref)  # Eq. 5 (m.1): implicit reward; DPO's log-partition cancels in a softmax
    k = s.shape[1]
    remaining = torch.ones(k, k, dtype=torch.bool, device=s.device).triu()[:-1]  # [k-1, k]: row i marks j >= i
    s_rem = s[:, None, :].masked_fill(~remaining, float("-inf"))  # [B, k-1, k], ranked items masked out
    log_z = s_rem.logsumexp(-1)  # logsumexp_{m>=i} s_m
    if tau > 0:  # Eq. 7 (m.4): q_i = softmax over the remaining j >= i of r_j / tau (m.2)
        q = (rewards[:, None, :] / tau).masked_fill(~remaining, float("-inf")).softmax(-1)
        target = (q * s[:, None, :]).sum(-1)  # sum_{j>=i} q_i(j) s_j   (q is exactly 0 on ranked items)
    else:  # Eq. 12 (m.5): hard ranking, the item at position i gets all the mass; k=2 gives Diffusion-DPO
        target = s[:, :-1]
    l_gdro = (log_z - target).sum(1)  # Eq. 7: sum over positions i = 1..k-1; i = 1 alone is Eq. 6 (m.3), top-1
    l_reg = err_policy[:, 0]  # Eq. 8 (m.6): plain flow matching on the best image; without it training collapses
    return (l_gdro + gamma * l_reg).mean()  # Eq. 9 (m.7), averaged over groups

# ============================================================================= 3. models
# What differs between model families (prompt encoding, the latent layout the transformer consumes, which the cache
# holds, the VAE's normalisation, the transformer call) is in their records in families.py; these functions call
# the record of the family at hand.


def pipeline_classes():
    """family -> diffusers pipeline class (it also saves and loads the family's LoRA files)."""
    import diffusers
    return {name: getattr(diffusers, f.pipeline) for name, f in FAMILIES.items()}


def schedule_mu(family, scheduler_config, latent_shape, steps):
    """mu of the shift the family's sampler applies to t (sample_t), for one cached latent of latent_shape drawn in
    `steps` sampler steps (FLUX.2's shift depends on them)."""
    f = FAMILIES[family]
    return f.shift_mu(scheduler_config, f.image_tokens(latent_shape), steps)


def make_scheduler(name, config):
    """The rollout ODE solver `name` (SAMPLERS) for a model whose flow-matching Euler scheduler has `config`. The
    multistep solvers run in diffusers' flow mode on their own grid of the same shifted schedule (SD3: shift; FLUX:
    the resolution's mu, which FluxPipeline passes); keys they do not know (FLUX's shift settings, which the pipeline
    reads from scheduler.config) are kept in their config."""
    import diffusers
    cls, settings = SAMPLERS[name]
    if name == "euler":
        return getattr(diffusers, cls).from_config(config)
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config.get("shift", 1.0),
                use_dynamic_shifting=bool(config.get("use_dynamic_shifting")))
    scheduler = getattr(diffusers, cls)(num_train_timesteps=config.get("num_train_timesteps", 1000), **flow, **settings)
    scheduler.register_to_config(**{k: v for k, v in config.items()
                                    if k not in scheduler.config and not k.startswith("_")})
    return scheduler


def load_pipeline(model, tiny=False, family="sd3", device="cpu", dtype=torch.float32):
    """The pipeline named by `model` (hub id or local folder), or the tiny one of `family`; returns (pipe, family).
    A model of another family than the one settle_model expected stops here."""
    from diffusers import DiffusionPipeline
    if tiny:
        from small_models import build_tiny_pipeline  # tiny random pipelines live outside the reading path
        pipe = build_tiny_pipeline(family)
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot load model {model!r}: {str(e).splitlines()[0]}")
    found = family_of_pipeline_class(type(pipe).__name__)
    if found is None:
        raise BadInput(f"--model {model}: a {type(pipe).__name__}; GDRO here supports {supported()}")
    if found != family:  # settle_model read the name wrong: its default guidance and the plan were another family's
        raise SystemExit(f"error: {model} is a {found} model, not {family} as its name suggested; "
                         "pass --guidance explicitly")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), found  # from_pretrained already cast to dtype; the tiny model stays fp32


def compile_transformer(transformer, **options):
    """--compile: torch.compile(**options) each transformer block (regional compilation, as diffusers'
    compile_repeated_blocks). Blocks of one kind share their compiled code, so compiling costs a few blocks, not
    the 24 (SD3.5-M) to 57 (FLUX.1) of the whole model traced in a row, for nearly all of the whole model's gain."""
    for child in transformer.children():
        if isinstance(child, torch.nn.ModuleList):  # transformer_blocks, FLUX's single_transformer_blocks
            for block in child:
                block.compile(**options)


def encode_prompt(pipe, family, prompt):
    """Text conditioning of one prompt: (cond, uncond). cond is cached for training; uncond (the negative prompt's,
    for CFG; {} for a model without CFG) is only needed by rollouts. Tensors have a leading batch dimension of 1."""
    with torch.no_grad():
        return FAMILIES[family].encode_prompt(pipe, prompt)


@torch.no_grad()
def generate(pipe, cond, uncond, seeds, steps, guidance, resolution):
    """Latents of len(seeds) images from the pipeline's own sampler, in the transformer's layout (the cache's).
    cond/uncond hold one prompt (batch 1, broadcast) or one row per seed. One CPU generator per image, so an
    image depends on its seed only, not on the batching."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    rows = lambda c: {k: v.expand(len(seeds), *v.shape[1:]) for k, v in c.items()}  # one row per image
    family = FAMILIES[family_of_pipeline_class(type(pipe).__name__)]
    latents = pipe(**family.sampler_inputs(rows(cond), rows(uncond), guidance), generator=generators, height=resolution,
                   width=resolution, num_inference_steps=steps, output_type="latent").images
    return family.sampler_latents(pipe, latents)


@torch.no_grad()
def decode(pipe, family, latents):
    """Latents in the transformer's layout -> list of PIL images."""
    pixels = FAMILIES[family].decode_latents(pipe, latents)
    return pipe.image_processor.postprocess(pixels, output_type="pil")


@torch.no_grad()
def encode_images(pipe, family, images, resolution):
    """PIL images -> clean latents in the transformer's layout: each image resized so its short side is
    `resolution` and centre-cropped square, then the VAE's posterior MEAN (no sampling noise), normalised as the
    model's sampler produces latents (the exact inverse of decode's VAE step)."""
    squares = []
    for image in images:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
        image = image.resize((w, h), resample=3)  # bicubic
        left, top = (w - resolution) // 2, (h - resolution) // 2
        squares.append(image.crop((left, top, left + resolution, top + resolution)))
    pixels = pipe.image_processor.preprocess(squares, height=resolution, width=resolution)
    return FAMILIES[family].encode_pixels(pipe, pixels)

# ============================================================================= 4. phase 1: the offline rollout cache
# OUT/cache/manifest.json says how the cache was made; OUT/cache/prompt_NNNNNN.safetensors holds one prompt's group:
# x0 [n, ...] (clean latents), rewards [n], seeds [n] (or the image files), and its text conditioning. Every file is
# written under a temporary name and renamed, so a kill leaves whole shards only and a rerun resumes at the first
# missing one, on any number of processes.


def cache_manifest(args):
    """What makes two caches the same: a cache is never mixed from shards made differently."""
    if args.from_images:
        source = {"source": "images", "images": str(Path(args.from_images).resolve()), "group_size": args.group_size,
                  "metadata_sha256": file_sha256(Path(args.from_images) / "metadata.jsonl")}
    else:
        reward_file = (Path(__file__).with_name("reward_ocr.py") if args.reward == "ocr"
                       else args.reward.rpartition(":")[0])
        source = {"source": "rollouts", "images_per_prompt": args.images_per_prompt, "steps": args.steps,
                  "sampler": args.sampler, "guidance": args.guidance, "reward": args.reward,
                  "reward_sha256": file_sha256(reward_file), "seed": args.seed}
    return {"model": f"tiny-{args.family}" if args.tiny else args.model, "resolution": args.resolution, **source}


def load_reward(spec):
    """'ocr' -> reward_ocr.OcrReward(); 'FILE.py:FUNCTION' -> that function. Either is fn(images, prompts)."""
    if spec == "ocr":
        from reward_ocr import OcrReward
        return OcrReward()
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise BadInput(f"--reward {spec}: importing {path} failed ({type(e).__name__}: {e})")
    if not callable(getattr(module, name, None)):
        raise BadInput(f"--reward {spec}: {path} has no function {name!r}")
    return getattr(module, name)


def score(reward_fn, spec, images, prompt, i):
    """The reward of one prompt's images as a list of finite floats; a reward that raises or returns anything else
    stops the run with one line (its own traceback below it)."""
    n = len(images)
    rerun = ("finished shards are kept. Fix it and rerun the same command (shards are scored by the reward file as "
             "it is: after editing it, delete the cache folder or use another --out)")
    try:
        returned = list(reward_fn(images, [prompt] * n))
        real = all(isinstance(r, numbers.Real) or (torch.is_tensor(r) and r.numel() == 1) for r in returned)
        rewards = [float(r) for r in returned] if real else None  # never parse strings as rewards
    except Exception as e:
        frames = "".join(traceback.format_exception(e)[1:])
        raise SystemExit(f"error: the reward {spec} failed on prompt {i + 1} ({type(e).__name__}: {e}); "
                         f"{rerun}\n{frames}")
    if rewards is None or len(rewards) != n or not all(math.isfinite(r) for r in rewards):
        raise SystemExit(f"error: the reward {spec} returned {returned[:8]!r} for the {n} images of prompt {i + 1}; "
                         f"expected {n} finite numbers; {rerun}")
    return rewards


def build_cache(pipe, family, prompts, reward_fn, cache_dir, args):
    """Phase 1: the frozen base model draws args.images_per_prompt images per prompt with the sampler args.sampler,
    the reward scores them. Scoring and writing prompt i run in a worker thread while prompt i+1 generates: OCR
    would otherwise leave the GPU idle for about as long as it generates. A shard exists only once scored and
    written. Under torchrun each process takes its share of the missing prompts."""
    n, batch = args.images_per_prompt, args.rollout_batch or args.images_per_prompt
    todo = my_missing_shards(cache_dir, len(prompts))

    def score_and_save(i, x0, seeds, cond, images):
        rewards = score(reward_fn, args.reward, images, prompts[i], i)
        write_shard(cache_dir, i, prompts[i], {"x0": x0, "rewards": torch.tensor(rewards),
                                               "seeds": torch.tensor(seeds), **{k: v[0] for k, v in cond.items()}})

    base_scheduler, pipe.scheduler = pipe.scheduler, make_scheduler(args.sampler, pipe.scheduler.config)
    with ThreadPoolExecutor(max_workers=1) as scorer, stop_when_done("finishing the prompts in flight") as stop:
        scoring = None
        bar = tqdm(todo, desc="rollout cache", unit="prompt", disable=not is_main_process())
        for i in bar:
            if stop:  # a first Ctrl-C or SIGTERM: what is generated gets scored and written below, then we stop
                break
            cond, uncond = encode_prompt(pipe, family, prompts[i])
            seeds = [image_seed(args.seed, i, j, n) for j in range(n)]
            x0 = torch.cat([generate(pipe, cond, uncond, seeds[j:j + batch], args.steps, args.guidance,
                                     args.resolution) for j in range(0, n, batch)])
            images = decode(pipe, family, x0)
            if scoring is not None:
                scoring.result()  # at most one prompt in flight; re-raises the worker's error here
            scoring = scorer.submit(score_and_save, i, x0, seeds, cond, images)
        if scoring is not None:
            scoring.result()
    if stop:
        raise cache_interrupted(cache_dir, prompts)
    pipe.scheduler = base_scheduler  # the model's own schedule again (training's t follows it)
    barrier()


def build_cache_from_images(pipe, family, prompts, groups, cache_dir, args):
    """Phase 1 from your own data: each prompt's images are encoded with the model's own VAE and written as ordinary
    cache shards with their given rewards; training cannot tell them from rollouts."""
    from PIL import Image
    for i in tqdm(my_missing_shards(cache_dir, len(prompts)), desc="encode images", unit="prompt",
                  disable=not is_main_process()):
        cond, _ = encode_prompt(pipe, family, prompts[i])
        images = [Image.open(file) for file, _ in groups[i]]
        x0 = torch.cat([encode_images(pipe, family, images[j:j + 8], args.resolution)
                        for j in range(0, len(images), 8)])
        write_shard(cache_dir, i, prompts[i], {"x0": x0, "rewards": torch.tensor([r for _, r in groups[i]]),
                                               **{k: v[0] for k, v in cond.items()}},
                    files=json.dumps([f.name for f, _ in groups[i]]))
    barrier()

# ============================================================================= 5. phase 2: training


def keyed_generator(*key):
    """A CPU generator seeded by a key such as (seed, "group", g): every draw is a function of what it is for, not of
    how many draws came before, so a step's groups are the same whatever the micro-batches, the number of
    processes, or an interruption and --resume."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n_prompts):
    """The prompts in the order epoch `epoch` visits them: every prompt once before any prompt twice."""
    return torch.randperm(n_prompts, generator=keyed_generator(seed, "epoch", epoch)).tolist()


def training_batch(cache_dir, sizes, groups, args, family, scheduler_config, device):
    """Global groups g (numbers over the whole run) -> the inputs of velocity_errors and gdro_loss for them.
    Group g visits prompt epoch_order[g mod P] of epoch g // P and takes k of its cached images; its own generator
    draws the images, t and eps. Returns dict(x0 [B,k,...], cond {name: [B,...]}, rewards [B,k], t [B], eps [B,...])."""
    rows, conds = [], []
    for g in groups:
        gen = keyed_generator(args.seed, "group", g)
        i = epoch_order(args.seed, g // len(sizes), len(sizes))[g % len(sizes)]
        shard = read_shard(cache_dir, i)
        images = torch.randperm(sizes[i], generator=gen)[:args.group_size]
        x0 = shard.pop("x0")[images].float()
        mu = schedule_mu(family, scheduler_config, x0.shape[1:], args.steps)  # the shift the rollouts' sampler used
        rows.append({"x0": x0, "rewards": shard.pop("rewards")[images].float(),
                     "eps": torch.randn(x0.shape[1:], generator=gen), "t": sample_t(1, mu, gen, args.uniform_t)[0]})
        shard.pop("seeds", None)
        conds.append(shard)  # what is left is the prompt's conditioning
    stack = lambda dicts: {k: torch.stack([d[k] for d in dicts]).to(device) for k in dicts[0]}
    return {**stack(rows), "cond": stack(conds)}


def group_stats(loss, err_policy, err_ref, rewards):
    """Sums over a micro-batch's groups, for the log: [loss, groups, groups with one strict best image, of those the
    ones whose implicit reward put the best image first, err_policy, err_ref]. A group whose best reward is tied
    has no single right answer and is left out of the ranking accuracy (its share is logged)."""
    s = -(err_policy - err_ref).detach()
    best = rewards.max(1, keepdim=True).values
    strict = (rewards == best).sum(1) == 1
    hit = (rewards.gather(1, s.argmax(1, keepdim=True)) == best)[:, 0]
    B = len(rewards)
    return torch.stack([loss.detach() * B, torch.tensor(float(B), device=loss.device), strict.float().sum(),
                        (hit & strict).float().sum(), err_policy.detach().mean(1).sum(), err_ref.mean(1).sum()])


@contextlib.contextmanager
def training_context(transformer):
    """How the training step's forward AND backward run. Gradient checkpointing re-runs forwards inside the
    backward, and an op's backward is that of the kernel its forward chose, so the whole step runs under this.
    - Attention: any SDPA backend but cuDNN's. On CUDA, PyTorch's cuDNN attention backward returns NaN gradients
      (tiny FLUX) or fails outright (FLUX.1-dev size) (torch 2.11, H200). Rollouts and eval keep PyTorch's own
      choice: no backward there.
    - LoRA inputs stay in the compute dtype: peft would cast each LoRA layer's bf16 input to the LoRA's fp32 and
      autocast would cast it back to bf16 for the matmul: two full-size copies per layer, one kept for the
      backward (16 % of what a FLUX.1 block keeps, README), for a bit-identical result (bf16 -> fp32 -> bf16)."""
    from peft.helpers import disable_input_dtype_casting
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]), \
            disable_input_dtype_casting(transformer):
        yield


def settle_model(args):
    """Before the model loads, what follows from it: args.family (--tiny's, a local folder's model_index.json, else
    the hub id's name, else --family; main checks it once the model has loaded), the family's usual --guidance and
    --steps, and --resolution (the paper's 512, or a local model's own size when smaller). gdro.py and eval.py both
    settle them here."""
    folder = Path(args.model)
    if not args.tiny and (folder / "model_index.json").is_file():
        pipeline = json.loads((folder / "model_index.json").read_text())["_class_name"]
        args.family = family_of_pipeline_class(pipeline)
        if args.family is None:
            raise BadInput(f"--model {args.model} is a {pipeline} (its model_index.json); supported: {supported()}")
    elif not args.tiny:
        args.family = family_of_hub_id(args.model) or args.family
    family = FAMILIES[args.family]
    args.guidance = family.guidance if args.guidance is None else args.guidance
    if getattr(args, "steps", 0) is None:  # eval.py has its own default
        args.steps = family.steps
    native = PAPER_RESOLUTION
    configs = [folder / "transformer" / "config.json", folder / "vae" / "config.json"]
    if not args.tiny and all(c.is_file() for c in configs):
        transformer, vae = (json.loads(c.read_text()) for c in configs)  # latent side x the VAE's downsampling
        native = transformer.get("sample_size", native) * 2 ** (len(vae["block_out_channels"]) - 1)
    args.resolution = min(PAPER_RESOLUTION, native) if args.resolution is None else args.resolution
    return args


def training_plan(args, sizes):
    """What a run will do with its cache, before any heavy work: one JSON-able dict."""
    P, groups = len(sizes), args.max_steps * args.groups_per_step
    visits = [groups // P + (1 if r < groups % P else 0) for r in range(P)]  # epochs: visits differ by at most one
    k = args.group_size
    seen = sum(1 - (1 - k / n) ** v for n, v in zip(sizes, visits))  # expected share of a prompt's images drawn
    plan = {"family": args.family, "pipeline": FAMILIES[args.family].pipeline, "guidance": args.guidance,
            "steps": args.steps, "resolution": args.resolution, "prompts": P,
            "images_per_prompt": max(sizes) if len(set(sizes)) == 1 else f"{min(sizes)}-{max(sizes)}",
            "images_cached": sum(sizes), "group_size": k, "groups_per_step": args.groups_per_step,
            "micro_batch": args.micro_batch, "max_steps": args.max_steps, "groups_trained": groups,
            "epochs": round(groups / P, 3), "prompt_coverage": round(min(groups, P) / P, 4),
            "image_coverage": round(seen / P, 4)}
    measured = args.resolution == PAPER_RESOLUTION and not args.tiny  # the H200 figures: real models at 512 px
    if measured and args.family in H200_SECONDS and not args.from_images:
        h = H200_SECONDS[args.family]
        rollout_h = P * h["rollout_16x10"] * args.images_per_prompt / 16 * args.steps / 10 / 3600
        train_h = groups * h["group_step"] * k / 6 / 3600
        plan.update(est_rollout_gpu_hours_h200=round(rollout_h, 2), est_train_gpu_hours_h200=round(train_h, 2))
    return plan


def add_lora(transformer, targets, args):
    """The trained part: a LoRA on targets (the family's LORA_TARGETS), A drawn from --seed and B zero (the policy
    starts as the reference), in fp32 with its AdamW state while the frozen base stays in bf16 on CUDA. Returns the
    LoRA's parameters."""
    from peft import LoraConfig
    transformer.requires_grad_(False)
    torch.manual_seed(args.seed)
    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                       target_modules=targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if args.grad_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.compile:
        compile_transformer(transformer)
    return params


def start_or_resume(args, transformer, optimizer):
    """(first step, last checkpoint): (0, None) for a new run; with --resume the newest checkpoint's, loaded. Rank 0
    cuts metrics.jsonl back to that step (a kill may have left lines past it, or a torn last line)."""
    start, last_ckpt = 0, None
    if args.resume:
        last_ckpt = newest_checkpoint(Path(args.out) / "checkpoints")
        start = load_checkpoint(last_ckpt, transformer, optimizer)
        if is_main_process():
            print(f"resumed from {last_ckpt} (step {start} of {args.max_steps})")
    if is_main_process():
        Path(args.out).mkdir(parents=True, exist_ok=True)
        metrics = Path(args.out) / "metrics.jsonl"
        write_atomic(metrics, "".join(line + "\n" for line in read_metrics(metrics, start)).encode())
    return start, last_ckpt


def log_line(window, step, args, t0):
    """A line of metrics.jsonl: the groups of the --log-every window pooled. window: per step, the group_stats sums
    [loss, groups, strict groups, hits, err_policy, err_ref] and the gradient norm."""
    loss, n, strict, hits, ep, er = map(sum, zip(*[row[:6] for row in window]))
    return {"step": step, "loss": loss / n, "rank_acc": hits / strict if strict else None,
            "tied_groups": 1 - strict / n, "grad_norm": torch.stack([row[6] for row in window]).mean().item(),
            "err_policy": ep / n, "err_ref": er / n, "lr": args.lr, "time_s": round(time.time() - t0, 2)}


def train(transformer, family, pipeline_class, scheduler_config, cache_dir, sizes, args, device, on_step=None):
    """Phase 2: GDRO on the cache. Only the LoRA trains; the reference is the adapter switched off.
    on_step(step, batch), if given, runs after each optimizer step with the last micro-batch's inputs (bench.py)."""
    rank, world = rank_and_world()
    params = add_lora(transformer, LORA_TARGETS[family], args)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    start, last_ckpt = start_or_resume(args, transformer, optimizer)
    model = transformer  # under torchrun: DDP averages the LoRA's gradients across processes
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(transformer, broadcast_buffers=False)
    guidance = args.guidance if getattr(transformer.config, "guidance_embeds", False) else None
    G, M, ckpt_dir = args.groups_per_step, args.micro_batch, Path(args.out) / "checkpoints"
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    window, t0, step = [], time.time(), start
    bar = tqdm(range(start, args.max_steps), desc="GDRO training", unit="step", initial=start, total=args.max_steps,
               disable=rank != 0)
    with stop_when_done("finishing this step and saving a checkpoint") as stop:
        try:
            for step in bar:
                # this process's share of the step's G groups, in micro-batches of M; each loss is scaled so that the
                # accumulated (and, across processes, averaged) gradient is that of the mean over all G groups
                mine = range(step * G + rank * G // world, step * G + (rank + 1) * G // world)
                micro_batches = [mine[m:m + M] for m in range(0, len(mine), M)]
                stats = torch.zeros(6, device=device)
                for m, groups in enumerate(micro_batches):
                    batch = training_batch(cache_dir, sizes, groups, args, family, scheduler_config, device)
                    sync = model.no_sync() if world > 1 and m < len(micro_batches) - 1 else contextlib.nullcontext()
                    with sync, training_context(transformer):
                        with autocast:
                            err_policy, err_ref = velocity_errors(model, family, batch["x0"], batch["cond"],
                                                                  batch["t"], batch["eps"], guidance)
                        loss = gdro_loss(err_policy, err_ref, batch["rewards"], args.beta, args.tau, args.gamma,
                                         args.normalize_rewards)
                        (loss * len(groups) * world / G).backward()
                    stats += group_stats(loss, err_policy, err_ref, batch["rewards"])
                stats = torch.cat([stats, torch.tensor([float(bool(stop))], device=device)])
                if world > 1:
                    dist.all_reduce(stats)  # the log's sums, and whether any process was asked to stop
                *sums, stop_now = stats.tolist()  # the one host-device sync per step
                if not math.isfinite(sums[0]):
                    raise SystemExit(f"error: non-finite loss at step {step}; stopped. Last good checkpoint: "
                                     f"{last_ckpt}")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                window.append((*sums, grad_norm))
                if done % args.log_every == 0 or done == args.max_steps:
                    line, window = log_line(window, done, args, t0), []
                    if rank == 0:
                        bar.set_postfix(loss=f"{line['loss']:.4f}", tied=f"{line['tied_groups']:.0%}",
                                        rank_acc="n/a" if line["rank_acc"] is None else f"{line['rank_acc']:.2f}")
                        append_line(Path(args.out) / "metrics.jsonl", json.dumps(line))
                stop_now = stop_now if world > 1 else bool(stop)  # alone, a Ctrl-C up to here counts
                if rank == 0 and (done % args.save_every == 0 or done == args.max_steps or stop_now):
                    last_ckpt = save_checkpoint(ckpt_dir, done, pipeline_class, transformer, optimizer)
                if on_step is not None:
                    on_step(step, batch)
                if stop_now:
                    barrier()
                    raise SystemExit(f"interrupted after step {done}; saved {ckpt_dir / f'step_{done:06d}'}; "
                                     "continue with the same command and --resume")
        except KeyboardInterrupt:  # a second signal: the step in flight is discarded
            raise SystemExit(f"interrupted during step {step + 1}, which was discarded; last checkpoint: {last_ckpt}")
        finally:
            bar.close()
    if rank == 0:
        save_lora(pipeline_class, transformer, Path(args.out) / "lora")
    barrier()
    return Path(args.out) / "lora"


# ============================================================================= 6. main
# --------------------------------------------------------------------- inputs, all checked before any model loads


def check_args(args, world):
    """Every flag's range, before anything loads or is written."""
    finite = lambda x: x is not None and math.isfinite(x)
    rules = [("--images-per-prompt", args.images_per_prompt >= 2, "at least 2"),
             ("--resolution", args.resolution >= RESOLUTION_FACTOR and args.resolution % RESOLUTION_FACTOR == 0,
              f"a positive multiple of {RESOLUTION_FACTOR} (the VAE's 8x and the 2x2 patches)"),
             ("--steps", args.steps >= 1, "at least 1"),
             ("--guidance", args.guidance is None or (finite(args.guidance) and args.guidance >= 0), "finite and >= 0"),
             ("--rollout-batch", args.rollout_batch is None or args.rollout_batch >= 1, "at least 1"),
             ("--beta", finite(args.beta) and args.beta >= 0, "finite and >= 0"),
             ("--tau", finite(args.tau) and args.tau >= 0, "finite and >= 0 (0 = hard ranking)"),
             ("--gamma", finite(args.gamma) and args.gamma >= 0, "finite and >= 0"),
             ("--group-size", 2 <= args.group_size and (args.from_images or args.group_size <= args.images_per_prompt),
              "at least 2 and at most --images-per-prompt"),
             ("--max-steps", args.max_steps >= 0, ">= 0"),
             ("--groups-per-step", args.groups_per_step >= 1 and args.groups_per_step % world == 0,
              f"at least 1 and a multiple of the {world} processes"),
             ("--micro-batch", args.micro_batch >= 1, "at least 1"),
             ("--lr", finite(args.lr) and args.lr > 0, "finite and > 0"),
             ("--max-grad-norm", finite(args.max_grad_norm) and args.max_grad_norm > 0, "finite and > 0"),
             ("--lora-rank", args.lora_rank >= 1, "at least 1"),
             ("--log-every", args.log_every >= 1, "at least 1"),
             ("--save-every", args.save_every >= 1, "at least 1"),
             ("--seed", args.seed >= 0, ">= 0"),
             ("--max-prompts", args.max_prompts is None or args.max_prompts >= 1, "at least 1")]
    for flag, ok, must in rules:
        if not ok:
            raise BadInput(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: must be {must}")
    if (args.prompts is None) == (args.from_images is None):
        raise BadInput("give --prompts FILE (sample a cache) or --from-images DIR (your own images), one of them")
    if args.compile and not (torch.cuda.is_available() and importlib.util.find_spec("triton")):
        raise BadInput("--compile needs a CUDA GPU with Triton (torch.compile's GPU backend); drop the flag here")
    if args.reward != "ocr" and not args.from_images:
        path, _, name = args.reward.rpartition(":")
        if not path.endswith(".py") or not name or not os.path.isfile(path):
            raise BadInput(f"--reward {args.reward!r}: expected 'ocr' or an existing FILE.py:FUNCTION")


def main(argv=None):
    """The whole run: python gdro.py ARGS, or gdro.main([ARGS...]) from Python; returns the LoRA folder."""
    args = settle_model(parse_args(argv))
    device = init_distributed()
    rank, world = rank_and_world()
    check_args(args, world)
    if args.from_images:
        prompts, image_groups = read_image_folder(args.from_images, args.group_size)
        prompts, image_groups = prompts[:args.max_prompts], image_groups[:args.max_prompts]
    else:
        prompts = read_prompts(args.prompts, args.reward, args.max_prompts)
    out, cache_dir = Path(args.out), Path(args.out) / "cache"
    sizes = [len(g) for g in image_groups] if args.from_images else [args.images_per_prompt] * len(prompts)
    plan = training_plan(args, sizes)
    if rank == 0:
        print("plan: " + ", ".join(f"{k} {v}" for k, v in plan.items()))
        if plan["prompt_coverage"] < 0.5:
            print(f"warning: training visits only {plan['prompt_coverage']:.0%} of the cached prompts; raise "
                  "--max-steps or --groups-per-step, or cache fewer prompts (--max-prompts)")
    if args.dry_run:
        if rank == 0:
            print(json.dumps(plan))
        return None
    if device.type == "cpu" and not args.tiny and rank == 0:
        print("note: no CUDA GPU, running on the CPU: fine for a small local model; the real models need a GPU")
    check_out(out)
    lock_out(out, create=False)  # a run in OUT already: say so before anything else
    check_run_state(args, out)
    manifest = cache_manifest(args)
    check_manifest(cache_dir, manifest)
    cache_complete = all(shard_path(cache_dir, i).exists() for i in range(len(prompts)))
    reward_fn = None if cache_complete or args.from_images else load_reward(args.reward)
    if args.grad_checkpointing is None:
        args.grad_checkpointing = device.type == "cuda"
    config = run_config(args, out, world)
    lock_out(out)
    if rank == 0:  # -------- files: the manifest and config describe the run on disk
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
        write_atomic(out / "config.json", json.dumps(config, indent=2).encode())
    barrier()

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe, family = load_pipeline(args.model, args.tiny, args.family, device, dtype)
    if not cache_complete:
        if args.compile:
            compile_transformer(pipe.transformer)
        try:
            if args.from_images:
                build_cache_from_images(pipe, family, prompts, image_groups, cache_dir, args)
            else:
                build_cache(pipe, family, prompts, reward_fn, cache_dir, args)
        except KeyboardInterrupt:  # a second Ctrl-C: the prompts in flight are dropped
            raise cache_interrupted(cache_dir, prompts)
    sizes, mean_reward = check_cache(cache_dir, prompts)
    if rank == 0:
        print(f"cache: {len(prompts)} prompts, {sum(sizes)} images, mean reward {mean_reward:.4f}")

    # training needs only the transformer: release the text encoders and the VAE
    transformer, pipeline_class, scheduler_config = pipe.transformer, type(pipe), dict(pipe.scheduler.config)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    lora_dir = train(transformer, family, pipeline_class, scheduler_config, cache_dir, sizes, args, device)
    if rank == 0:
        print(f"LoRA saved to {lora_dir} (load with pipe.load_lora_weights({str(lora_dir)!r}))")
    return lora_dir


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside the cache build and training (which say more): nothing half-written
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
