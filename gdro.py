"""GDRO: Group-level Direct Reward Optimization for rectified-flow text-to-image models, in one file.

Paper: "GDRO: Group-level Reward Post-training Suitable for Diffusion Models" (arXiv 2601.02036).
GDRO trains fully offline, in two phases: (1) the FROZEN base model draws a group of images per prompt once
and an explicit reward scores them once; (2) a LoRA learns to rank each group: at a random noise level the gap
between the policy's and the frozen reference's velocity errors is a DPO-style implicit reward, and a
Plackett-Luce cross-entropy ranks the group by it against a softmax of the explicit rewards (Eqs. 5-9).

This file reads top to bottom:
  1. settings   the paper's defaults as flags, and the constants
  2. the method sample_t -> velocity_errors -> gdro_loss: one block that needs nothing else here; read it, copy it
  3. models     a record per model family (SD3 / SD3.5 and FLUX.1; families.py has more), the pipelines
  4. phase 1    the offline rollout cache (or your own images and scores: --from-images)
  5. phase 2    training: the plan, groups drawn in epochs, one step, the loop
  6. plumbing   processes, signals, crash-safe files, the lock, input files, cache shards, checkpoints, the run folder
  7. main       every input checked before any model loads; then phase 1, phase 2

    python gdro.py --prompts ocr.txt                                  # SD3.5-Medium, the paper's OCR setting
    python gdro.py --prompts ocr.txt --model black-forest-labs/FLUX.1-dev
    python gdro.py --prompts ocr.txt --dry-run                        # the plan and its cost, nothing loaded
    torchrun --nproc_per_node=8 gdro.py --prompts ocr.txt             # 8 GPUs, same result as one

Exit codes: 2 = a refused input (also a folder in use, a damaged checkpoint), 1 = a failure, or a stop signal in
the cache build or training (finished work kept), 130 = a Ctrl-C anywhere else (nothing half-written), 0 = done.
Equation numbers "Eq. N" are the paper's; "(m.N)" is item N of the method table in the README.
"""
import argparse, contextlib, dataclasses, errno, functools, gc, hashlib, importlib.util, io, json, math, numbers, os
import runpy, shutil, signal, sys, threading, time, traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save as safetensors_bytes
from tqdm import tqdm

# ============================================================================= 1. settings

RESOLUTION_FACTOR = 16  # every family: the VAE downsamples 8x and the transformer takes 2x2 patches
PAPER_RESOLUTION = 512  # the paper's image side; a smaller local model (the CPU text model) draws at its own size
# --dry-run's estimates at 512 px, bf16, one H200 (docs/cost.md: how): s of 16 images x 10 steps, of a k = 6 group
MEASURED = {"stabilityai/stable-diffusion-3.5-medium": dict(rollout_16x10=3.39, group_step=0.46,
                                                            gib={"none": 7.1, "int8": 5.0, "nf4": 4.1}),
            "black-forest-labs/FLUX.1-dev": dict(rollout_16x10=9.00, group_step=1.70,
                                                 gib={"none": 28.4, "int8": 17.3, "nf4": 12.4})}
QUANTIZE = {"none": None, "int8": "torchao", "nf4": "bitsandbytes"}  # --quantize (families.py): the package it needs

def image_seed(seed, i, j, n):
    """Image j of prompt i's seed: rollouts (and eval) reproduce image by image, however batched or split."""
    return seed + i * n + j

def add_model_flags(p):
    """The flags gdro.py and eval.py share: model, reward, prompts, how it draws (settle_model fills defaults)."""
    arg, d = p.add_argument, " (default: %(default)s)"
    arg("--model", default="stabilityai/stable-diffusion-3.5-medium", help="hub id or local folder of a pipeline" + d)
    arg("--reward", default="ocr", help="ocr, geneval (reward_*.py) or FILE.py:FUNCTION, fn(images, prompts)" + d)
    arg("--geneval-detector", help="--reward geneval's Mask2Former: hub id or local folder (default: GenEval's)")
    arg("--geneval-clip", help="--reward geneval's CLIP that names colours: hub id or folder (default: ViT-L/14)")
    arg("--tiny", action="store_true", help="tiny random model of the same classes (families.py); shrinks the run")
    arg("--family", help="sd3, flux or a family of families.py: --tiny's (sd3), or one the model's name does not say")
    arg("--max-prompts", type=int, help="use only the first N prompts (default: all)")
    arg("--resolution", type=int, help=f"image side, a multiple of {RESOLUTION_FACTOR} (default: 512, or the model's)")
    arg("--guidance", type=float, help="CFG or distilled guidance (default: the family's, e.g. 4.5 SD3, 3.5 FLUX.1)")

class Parser(argparse.ArgumentParser):
    """argparse whose refusals (an unknown flag, a value of the wrong type) are one line and exit 2, as BadInput's."""
    def error(self, message):
        raise BadInput(f"{message} (see --help)")

def parse_args(argv=None):
    p = Parser(description="GDRO: offline group-level reward post-training of a LoRA.")
    arg, d = p.add_argument, " (default: %(default)s)"
    arg("--prompts", help="text file, one prompt per line (UTF-8)")
    arg("--from-images", metavar="DIR", help="cache DIR/metadata.jsonl's images and rewards instead of sampling")
    arg("--out", default="runs/gdro", help="output folder: cache/, checkpoints/, lora/, metrics.jsonl" + d)
    add_model_flags(p)
    arg("--dry-run", action="store_true", help="print the plan (cache, coverage, expected GPU time) as JSON and exit")
    # phase 1: rollout cache
    arg("--images-per-prompt", type=int, default=16, help="images the frozen base draws per prompt, once" + d)
    arg("--steps", type=int, help="ODE sampler steps per rollout (default: 10, a step-distilled model's own)")
    arg("--sampler", default="euler", help="rollout ODE solver: euler (the model's; default), dpm++2m or unipc")
    arg("--rollout-batch", type=int, help="images per pipeline call (default: a whole prompt group)")
    # the loss (Eqs. 5-9)
    arg("--beta", type=float, default=12.0, help="implicit-reward scale, Eq. 5; OCR 12, GenEval 6" + d)
    arg("--tau", type=float, default=0.05, help="reward softmax temperature, Eq. 7; 0 = hard ranking, Eq. 12" + d)
    arg("--gamma", type=float, default=0.5, help="weight of the top-1 stabiliser, Eq. 8; OCR 0.5, GenEval 1.0" + d)
    arg("--group-size", type=int, default=6, help="k: images per group in the loss, from one prompt's cache" + d)
    arg("--normalize-rewards", action="store_true", help="z-score rewards within each group before /tau (not paper)")
    arg("--uniform-t", action="store_true", help="draw t uniformly instead of the base model's shifted logit-normal")
    # phase 2: training
    arg("--max-steps", type=int, default=300, help="optimizer steps; the paper's OCR run peaks near 300" + d)
    arg("--groups-per-step", type=int, default=8, help="groups per optimizer step, all processes together" + d)
    arg("--micro-batch", type=int, default=1, help="groups per forward/backward (gradients accumulate)" + d)
    arg("--lr", type=float, default=3e-4, help="AdamW learning rate" + d)
    arg("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm" + d)
    arg("--lora-rank", type=int, default=32, help="LoRA rank on the transformer's attention projections" + d)
    arg("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
        help="recompute activations in the backward: a second forward for memory a GPU lacks (default: on with CUDA)")
    arg("--compile", action="store_true", help="torch.compile the transformer's blocks (CUDA only)")
    arg("--quantize", default="none", choices=QUANTIZE, help="frozen base's weights in training: torchao int8, NF4" + d)
    arg("--quantize-rollouts", action="store_true", help="the cache drawn by the quantized base too (not the default)")
    arg("--report-to", default="none", choices=["none", "tensorboard", "wandb"], help="also log to it, in OUT/" + d)
    arg("--log-every", type=int, default=10, help="steps between lines of metrics.jsonl" + d)
    arg("--save-every", type=int, default=50, help="steps between checkpoints" + d)
    arg("--resume", action="store_true", help="continue training from the newest checkpoint in OUT/checkpoints")
    arg("--seed", type=int, default=0, help="seed of rollouts (image_seed) and of training's draws" + d)
    args = p.parse_args(argv)
    if args.tiny:  # a run shrunk for a CPU
        companion("--tiny").shrink_if_tiny(args, argv, say=is_main_process())
    return args

def flag_value(args, flag):
    """The value of a flag ("--max-steps" is args.max_steps): refusals name the flag and what it was set to."""
    return getattr(args, flag.removeprefix("--").replace("-", "_"))

def companion(feature, module="families"):
    """families.py (more families, --tiny's pipelines, image folders, extras) or reward_ocr.py, for a feature."""
    if not importlib.util.find_spec(module):
        raise BadInput(f"{feature} needs {module}.py beside gdro.py")
    return importlib.import_module(module)

# ============================================================================= 2. the method
# Notation (diffusers' rectified flow): x_t = (1 - t) x0 + t eps, target velocity v = eps - x0, t in (0, 1).
# The policy is base + LoRA; the reference is the same transformer with the adapter switched off (no second copy).
# This block needs only torch, math and contextlib: copy it into your own trainer.

def sample_t(n, mu, generator, uniform=False):
    """n noise levels t in (0, 1), drawn as the base model was trained: logit-normal(0, 1), then the sampler's
    exponential shift t -> e^mu / (e^mu + 1/t - 1), so training sees the noise levels the sampler visits. mu: the
    model's shift (a fixed shift s is mu = log s; with dynamic shifting it grows with the resolution)."""
    u = torch.rand(n, generator=generator) if uniform else torch.sigmoid(torch.randn(n, generator=generator))
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))

@contextlib.contextmanager
def adapter_disabled(transformer):
    """The reference model: the LoRA switched off for the block (diffusers' PEFT integration)."""
    model = getattr(transformer, "module", transformer)  # under DistributedDataParallel the model is its .module
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()

def velocity_errors(velocity, transformer, x0, cond, t, eps):
    """Per-image velocity errors of the policy and of the frozen reference, on B groups of k cached images.

    velocity: velocity(transformer, x_t [N, ...], t [N], cond {name: [N, ...]}) -> the model's v [N, ...] in the
          convention above (section 3 has SD3's and FLUX.1's call); the reference is the same call, adapter off
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
    v_policy = velocity(transformer, x_t, t, cond)  # first: the host's adapter switching overlaps it
    with torch.no_grad(), adapter_disabled(transformer):
        v_ref = velocity(transformer, x_t, t, cond)
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
# One record per model family holds what differs: prompts, the cached latent layout, the VAE, the transformer's call.

def pack_latents(z):
    """FLUX's layout: [N, C, H, W] VAE latents -> [N, H/2 * W/2, 4C], one token per 2x2 patch (as FluxPipeline)."""
    n, c, h, w = z.shape
    return z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)

def unpack_latents(x):
    """The inverse of pack_latents, for square images."""
    n, seq_len, c4 = x.shape
    side = math.isqrt(seq_len)
    return x.view(n, side, side, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, 2 * side, 2 * side)

class Family:
    """A model family's record (docs/models.md); its defaults here are shared, and velocity() returns v = eps - x0."""
    name, pipeline, hub_names = None, None, ()
    guidance, steps, scheduler, packed = None, 10, {}, False
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    pack, unpack = staticmethod(pack_latents), staticmethod(unpack_latents)

    def sampler_inputs(self, cond, uncond, guidance):
        return {**cond, **{"negative_" + k: v for k, v in uncond.items()}, "guidance_scale": guidance}

    def sampler_latents(self, pipe, latents):
        return latents  # most pipelines return output_type="latent" in the cached layout

    def shift_mu(self, scheduler_config, tokens, steps):
        """A fixed shift s is mu = log s; a dynamic one grows linearly with the tokens (diffusers' calculate_shift)."""
        c = scheduler_config
        if c.get("use_dynamic_shifting"):
            slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
            return c["base_shift"] + slope * (tokens - c["base_image_seq_len"])
        return math.log(c["shift"])

    def encode_pixels(self, pipe, pixels):
        """Pixels in [-1, 1] -> the VAE posterior's MEAN, normalised as the sampler's latents (decode's inverse)."""
        c, z = pipe.vae.config, pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).latent_dist.mean
        z = (z - c.shift_factor) * c.scaling_factor
        return self.pack(z) if self.packed else z

    def decode_latents(self, pipe, latents):
        c, z = pipe.vae.config, self.unpack(latents) if self.packed else latents
        return pipe.vae.decode(z.to(pipe.vae.dtype) / c.scaling_factor + c.shift_factor).sample

class SD3(Family):
    """SD3 / SD3.5: two CLIPs + T5, CFG with the empty prompt; the VAE's grid; takes t x 1000 and predicts v."""
    name, pipeline, hub_names = "sd3", "StableDiffusion3Pipeline", ("stable-diffusion-3", "sd3")
    guidance, scheduler = 4.5, dict(shift=3.0)  # SD3.5-Medium's usual CFG, its fixed shift

    def encode_prompt(self, pipe, prompt):
        length = min(pipe.tokenizer_3.model_max_length, 256)  # the pipeline's T5 length, or a shorter T5's
        pe, neg_pe, pooled, neg_pooled = pipe.encode_prompt(prompt, None, None, device=pipe.device,
                                                            max_sequence_length=length)
        return ({"prompt_embeds": pe, "pooled_prompt_embeds": pooled},
                {"prompt_embeds": neg_pe, "pooled_prompt_embeds": neg_pooled})

    def velocity(self, transformer, x_t, t, cond, guidance=None):
        return transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

class Flux(Family):
    """FLUX.1: CLIP pooled + T5, distilled guidance embedded (not schnell); packed 2x2 patches; takes t, predicts v."""
    name, pipeline, hub_names = "flux", "FluxPipeline", ("flux.1",)
    guidance, packed = 3.5, True  # FLUX.1-dev's distilled guidance
    scheduler = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)  # the shift grows with the resolution

    def encode_prompt(self, pipe, prompt):
        length = min(pipe.tokenizer_2.model_max_length, 512)
        pe, pooled, _ = pipe.encode_prompt(prompt, None, device=pipe.device, max_sequence_length=length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}, {}  # guidance-distilled: no uncond

    def velocity(self, transformer, x_t, t, cond, guidance=None):
        side = math.isqrt(x_t.shape[1])  # square images: the packed latent is a side x side grid of 2x2 patches
        grid = torch.arange(side, device=x_t.device, dtype=torch.float32)
        img_ids = torch.cartesian_prod(torch.zeros(1, device=x_t.device), grid, grid)  # RoPE ids (0, row, col)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x_t.device)
        g = None if guidance is None else torch.full((len(x_t),), guidance, device=x_t.device)
        return transformer(hidden_states=x_t, timestep=t, guidance=g, encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_prompt_embeds"], txt_ids=txt_ids,
                           img_ids=img_ids, return_dict=False)[0]

FAMILIES = {f.name: f for f in (SD3(), Flux())}  # the paper's models; families.py's join for a model of theirs

def load_more_families():
    """FAMILIES, with families.py's records (Qwen-Image, FLUX.2, Z-Image) joined, completed with Family's defaults."""
    if importlib.util.find_spec("families"):
        from families import RECORDS
        FAMILIES.update({r.name: type(r.__name__, (r, Family), {})() for r in RECORDS if r.name not in FAMILIES})
    return FAMILIES

def family_record(name):
    """The record of a family's name (sd3, flux, or one of families.py's)."""
    if name not in FAMILIES and name not in load_more_families():
        more = "" if importlib.util.find_spec("families") else " (families.py beside gdro.py adds four more)"
        raise BadInput(f"--family {name}: not a supported family; supported: {supported()}{more}")
    return FAMILIES[name]

def family_name(pipeline=None, hub_id=None):
    """The family of a pipeline class name or a hub id (the longest name wins: FLUX.2-klein over FLUX.2), or None."""
    def find():
        if pipeline is not None:
            return next((f.name for f in FAMILIES.values() if f.pipeline == pipeline), None)
        found = [(len(n), f.name) for f in FAMILIES.values() for n in f.hub_names if n in hub_id.lower()]
        return max(found)[1] if found else None
    return find() or (load_more_families() and find())  # families.py only when the paper's two do not match

def supported():
    return ", ".join(f"{f.pipeline} ({f.name})" for f in load_more_families().values())

def settle_model(args):
    """Before the model loads (gdro.py and eval.py): args.family (model_index.json, --family, the hub id or sd3), the
    family's usual --guidance and --steps, --resolution (the paper's 512, or a local model's own size if smaller)."""
    folder = Path(args.model)
    if not args.tiny and (folder / "model_index.json").is_file():
        pipeline = json.loads((folder / "model_index.json").read_text())["_class_name"]
        args.family = family_name(pipeline=pipeline)
        if args.family is None:
            raise BadInput(f"--model {args.model} is a {pipeline} (its model_index.json); supported: {supported()}")
    elif not args.family:
        args.family = (None if args.tiny else family_name(hub_id=args.model)) or "sd3"
    family = family_record(args.family)
    args.guidance = family.guidance if args.guidance is None else args.guidance
    if getattr(args, "steps", 0) is None:  # eval.py has its own default
        args.steps = family.steps
    native, configs = PAPER_RESOLUTION, [folder / "transformer" / "config.json", folder / "vae" / "config.json"]
    if not args.tiny and all(c.is_file() for c in configs):
        transformer, vae = (json.loads(c.read_text()) for c in configs)  # latent side x the VAE's downsampling
        native = transformer.get("sample_size", native) * 2 ** (len(vae["block_out_channels"]) - 1)
    args.resolution = min(PAPER_RESOLUTION, native) if args.resolution is None else args.resolution
    return args

def load_pipeline(model, tiny=False, family="sd3", device="cpu", dtype=torch.float32):
    """(pipe, its family's record) of `model` (hub id or local folder), or --tiny's random one of family `family`."""
    from diffusers import DiffusionPipeline
    if tiny:
        pipe = companion("--tiny").build_tiny_pipeline(family_record(family))
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            if type(e).__name__ == "GatedRepoError":  # huggingface_hub's: the model's licence is not accepted yet
                raise BadInput(f"--model {model} is gated: accept its licence at https://huggingface.co/{model} "
                               "with your account, then log in here with `hf auth login`")
            raise SystemExit(f"error: cannot load model {model!r}: {str(e).splitlines()[0]}")
    found = family_name(pipeline=type(pipe).__name__)
    if found != family:  # settle_model went by the name: the guidance, steps and plan were another family's
        raise BadInput(f"--model {model} is a {found} model, not {family}; pass --family {found}" if found else
                       f"--model {model}: a {type(pipe).__name__}; GDRO here supports {supported()}")
    if torch.device(device).type == "cpu" and not tiny and is_main_process():
        print("note: no CUDA GPU, running on the CPU: fine for a small local model; the real models need a GPU")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), FAMILIES[found]  # from_pretrained already cast to dtype; the tiny model stays fp32

def schedule_mu(family, scheduler_config, latent_shape, steps):
    """mu of the shift of t (sample_t) for a cached latent of latent_shape drawn in `steps` steps (FLUX.2's)."""
    tokens = latent_shape[0] if family.packed else latent_shape[-2] * latent_shape[-1] // 4
    return family.shift_mu(scheduler_config, tokens, steps)

@torch.no_grad()
def encode_prompt(pipe, family, prompt):
    """(cond, uncond) of one prompt, batch 1: cond is cached for training, uncond ({} without CFG) rollouts use."""
    return family.encode_prompt(pipe, prompt)

@torch.no_grad()
def generate(pipe, family, cond, uncond, seeds, steps, guidance, resolution):
    """Latents (cache layout) from the pipeline's sampler, one CPU generator per image: its seed alone decides it."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    rows = lambda c: {k: v.expand(len(seeds), *v.shape[1:]) for k, v in c.items()}  # one row per image
    latents = pipe(**family.sampler_inputs(rows(cond), rows(uncond), guidance), generator=generators, height=resolution,
                   width=resolution, num_inference_steps=steps, output_type="latent").images
    return family.sampler_latents(pipe, latents)

@torch.no_grad()
def decode(pipe, family, latents):
    """Latents in the transformer's layout -> list of PIL images."""
    return pipe.image_processor.postprocess(family.decode_latents(pipe, latents), output_type="pil")

# ============================================================================= 4. phase 1: the offline rollout cache
# OUT/cache/manifest.json says how the cache was made; OUT/cache/prompt_NNNNNN.safetensors holds one prompt's group:
# x0 [n, ...] (clean latents), rewards [n], seeds [n] (or the image files), and its text conditioning. Each file is
# written whole and renamed: a kill leaves whole shards, and a rerun resumes them on any number of processes.

def cache_manifest(args, cache_dir):
    """What makes two caches the same (manifest.json), checked: shards made another way are never mixed in."""
    if args.from_images:
        source = {"source": "images", "images": str(Path(args.from_images).resolve()), "group_size": args.group_size,
                  "metadata_sha256": file_sha256(Path(args.from_images) / "metadata.jsonl")}
    else:
        reward_file = args.reward.rpartition(":")[0] or Path(__file__).with_name(f"reward_{args.reward}.py")
        source = {"source": "rollouts", "images_per_prompt": args.images_per_prompt, "steps": args.steps,
                  "sampler": args.sampler, "guidance": args.guidance, "reward": args.reward,
                  "reward_sha256": file_sha256(reward_file), "seed": args.seed}
    manifest = {"model": f"tiny-{args.family}" if args.tiny else args.model, "resolution": args.resolution, **source,
                **({"quantized": args.quantize} if args.quantize_rollouts else {})}
    path = Path(cache_dir) / "manifest.json"
    if path.exists() and any(Path(cache_dir).glob("prompt_*.safetensors")):  # without shards: a new manifest
        try:
            found = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"unreadable cache manifest {path}: {e}")
        if diff := [f"{k}={found.get(k)!r} (now {v!r})" for k, v in manifest.items() if found.get(k) != v]:
            raise BadInput(f"the cache in {cache_dir} was built with {', '.join(diff)}; use another --out, or delete "
                           f"{cache_dir} to rebuild it")
    return manifest

def load_reward(spec, geneval_detector=None, geneval_clip=None, tiny_in=None):
    """fn(images, prompts) of 'ocr', 'geneval' (detector and clip None: GenEval's; with tiny_in and neither given,
    --tiny's random ones saved there) or 'FILE.py:FUNCTION'."""
    if spec == "ocr":
        return companion("--reward ocr", "reward_ocr").OcrReward()
    if spec == "geneval" and tiny_in and not (geneval_detector or geneval_clip):
        return companion("--tiny").tiny_geneval_reward(tiny_in)
    if spec == "geneval":
        return companion("--reward geneval", "reward_geneval").GenevalReward(geneval_detector, geneval_clip)
    path, _, name = spec.rpartition(":")
    try:
        fn = runpy.run_path(path).get(name)
    except (Exception, SystemExit) as e:  # a reward file that calls sys.exit() is at fault too
        raise BadInput(f"--reward {spec}: importing {path} failed ({type(e).__name__}: {e})")
    if not callable(fn):
        raise BadInput(f"--reward {spec}: {path} has no function {name!r}")
    return fn

def score(reward_fn, spec, images, prompt, i):
    """One prompt's rewards as finite floats; a reward that raises or returns anything else stops the run."""
    n = len(images)
    rerun = ("finished shards are kept. Fix it and rerun the same command (shards are scored by the reward file as "
             "it is: after editing it, delete the cache folder or use another --out)")
    try:
        returned = list(reward_fn(images, [prompt] * n))
    except (Exception, SystemExit) as e:  # sys.exit() in a reward would end the run with no word
        raise SystemExit(f"error: the reward {spec} failed on prompt {i + 1} ({type(e).__name__}: {e}); {rerun}\n"
                         + "".join(traceback.format_exception(e)[1:]))
    real = all(isinstance(r, numbers.Real) or (torch.is_tensor(r) and r.numel() == 1) for r in returned)
    if not real or len(returned) != n or not all(math.isfinite(r) for r in returned):  # never parse strings as rewards
        raise SystemExit(f"error: the reward {spec} returned {returned[:8]!r} for the {n} images of prompt {i + 1}; "
                         f"expected {n} finite numbers; {rerun}")
    return [float(r) for r in returned]

def build_cache(pipe, family, prompts, reward_fn, cache_dir, args, image_groups=None):
    """Phase 1: the frozen base draws each prompt's images with --sampler once (or image_groups' are encoded), the
    reward scores them; prompt i is scored and written in a thread while i+1 generates (else OCR idles the GPU)."""
    n, batch = args.images_per_prompt, args.rollout_batch or args.images_per_prompt
    def save(i, cond, tensors, **metadata):  # the prompt's conditioning stored as one row, not a batch of 1
        write_shard(cache_dir, i, prompts[i], {**tensors, **{k: v[0] for k, v in cond.items()}}, **metadata)
    def score_and_save(i, x0, seeds, cond, images):
        rewards = score(reward_fn, args.reward, images, prompts[i], i)
        save(i, cond, {"x0": x0, "rewards": torch.tensor(rewards), "seeds": torch.tensor(seeds)})
    base_scheduler = pipe.scheduler  # the model's own: Euler, on the schedule training's t follows
    if args.sampler != "euler":
        pipe.scheduler = companion("--sampler").make_scheduler(args.sampler, base_scheduler.config)
    if args.compile:
        companion("--compile").compile_transformer(pipe.transformer)
    barrier()  # every process lists the prompts without a shard before any writes one, then takes its share
    rank, world = rank_and_world()
    mine = [i for i in range(len(prompts)) if not shard_path(cache_dir, i).exists()][rank::world]
    with ThreadPoolExecutor(max_workers=1) as scorer, stop_when_done("finishing the prompts in flight") as stop:
        scoring = scorer.submit(int)  # stands for the prompt before the first: finished, nothing to wait for
        for i in progress(mine, "cache", "prompt"):
            if stop.is_set():  # a first Ctrl-C or SIGTERM: what is generated is scored and written below, then stop
                break
            cond, uncond = encode_prompt(pipe, family, prompts[i])
            if image_groups:  # your own images, not drawn: encoded by the VAE, scored as metadata.jsonl says
                files, rewards = zip(*image_groups[i])
                x0 = companion("--from-images").encode_images(pipe, family, files, args.resolution)
                save(i, cond, {"x0": x0, "rewards": torch.tensor(rewards)}, files=json.dumps([f.name for f in files]))
                continue
            seeds = [image_seed(args.seed, i, j, n) for j in range(n)]
            x0 = torch.cat([generate(pipe, family, cond, uncond, seeds[j:j + batch], args.steps, args.guidance,
                                     args.resolution) for j in range(0, n, batch)])
            images = decode(pipe, family, x0)
            scoring.result()  # at most one prompt in flight; re-raises the worker's error here
            scoring = scorer.submit(score_and_save, i, x0, seeds, cond, images)
        scoring.result()
    if stop.is_set():
        raise cache_interrupted(cache_dir, prompts)
    pipe.scheduler = base_scheduler
    barrier()

# ============================================================================= 5. phase 2: training

def training_plan(args, sizes):
    """What a run will do with its cache, before any heavy work (--dry-run prints it): one JSON-able dict."""
    P, groups, k = len(sizes), args.max_steps * args.groups_per_step, args.group_size
    visits = [groups // P + (1 if r < groups % P else 0) for r in range(P)]  # epochs: visits differ by at most one
    seen = sum(1 - (1 - k / n) ** v for n, v in zip(sizes, visits))  # expected share of a prompt's images drawn
    plan = {"family": args.family, "pipeline": family_record(args.family).pipeline, "guidance": args.guidance,
            "steps": args.steps, "resolution": args.resolution, "prompts": P,
            "images_per_prompt": max(sizes) if len(set(sizes)) == 1 else f"{min(sizes)}-{max(sizes)}",
            "images_cached": sum(sizes), "group_size": k, "groups_per_step": args.groups_per_step,
            "micro_batch": args.micro_batch, "max_steps": args.max_steps, "groups_trained": groups,
            "epochs": round(groups / P, 3), "prompt_coverage": round(min(groups, P) / P, 4),
            "image_coverage": round(seen / P, 4)}
    m = MEASURED.get(args.model) if args.resolution == PAPER_RESOLUTION and not args.tiny else None
    if m and not args.from_images:
        rollout_h = P * m["rollout_16x10"] * args.images_per_prompt / 16 * args.steps / 10 / 3600
        train_h = groups * m["group_step"] * k / 6 / 3600
        plan.update(est_rollout_gpu_hours_h200=round(rollout_h, 2), est_train_gpu_hours_h200=round(train_h, 2))
    if m and args.group_size == 6:
        plan["est_train_gib"] = m["gib"][args.quantize]
    return plan

def keyed_generator(*key):
    """A generator keyed by what it draws, e.g. (seed, "group", g): the same groups however split, run or resumed."""
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))

@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n_prompts):
    """The prompts in the order epoch `epoch` visits them: every prompt once before any prompt twice."""
    return torch.randperm(n_prompts, generator=keyed_generator(seed, "epoch", epoch)).tolist()

@dataclasses.dataclass(frozen=True)
class Run:
    """What every training step shares and nothing changes: made once, in main, after the cache is complete."""
    args: argparse.Namespace  # the settled flags
    family: Family
    pipeline_class: type  # the LoRA is saved in this pipeline's format
    scheduler_config: dict  # the model's schedule: the shift of t (schedule_mu)
    cache_dir: Path
    sizes: list  # [P] images cached per prompt
    device: torch.device

def training_batch(run, groups):
    """Groups g -> x0 [B,k,...], cond, rewards [B,k], t [B], eps [B,...]: k images of prompt epoch_order[g mod P]."""
    args, P, rows, conds = run.args, len(run.sizes), [], []
    for g in groups:
        gen = keyed_generator(args.seed, "group", g)
        i = epoch_order(args.seed, g // P, P)[g % P]
        shard = read_shard(run.cache_dir, i)
        images = torch.randperm(run.sizes[i], generator=gen)[:args.group_size]
        x0 = shard.pop("x0")[images].float()
        mu = schedule_mu(run.family, run.scheduler_config, x0.shape[1:], args.steps)  # the rollouts' sampler's shift
        rows.append({"x0": x0, "rewards": shard.pop("rewards")[images].float(),
                     "eps": torch.randn(x0.shape[1:], generator=gen), "t": sample_t(1, mu, gen, args.uniform_t)[0]})
        conds.append({k: v for k, v in shard.items() if k != "seeds"})  # what is left: the prompt's conditioning
    stack = lambda dicts: {k: torch.stack([d[k] for d in dicts]).to(run.device) for k in dicts[0]}
    return {**stack(rows), "cond": stack(conds)}

STATS = ("loss", "groups", "strict", "hits", "err_policy", "err_ref")  # group_stats' sums, in this order

def group_stats(loss, err_policy, err_ref, rewards):
    """The log's sums over B groups, a [6] tensor in STATS' order: the loss times B, B, the groups with a strict best
    image, those of them whose implicit reward ranks it first (rank_acc), the mean velocity errors summed."""
    best = rewards.max(1, keepdim=True).values
    strict = (rewards == best).sum(1) == 1
    hit = (rewards.gather(1, (err_ref - err_policy).argmax(1, keepdim=True)) == best)[:, 0]  # the best by s, Eq. 5
    B = len(rewards)
    return torch.stack([loss.detach() * B, torch.tensor(float(B), device=loss.device), strict.float().sum(),
                        (hit & strict).float().sum(), err_policy.detach().mean(1).sum(), err_ref.mean(1).sum()])

@contextlib.contextmanager
def training_context(transformer):
    """The step's forward and backward: any attention but cuDNN's (its backward gave NaN or failed on an H200,
    docs/cost.md); LoRA inputs kept in bf16, not cast to fp32 and back (16 % of a FLUX.1 block's memory)."""
    from peft.helpers import disable_input_dtype_casting
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]), \
            disable_input_dtype_casting(transformer):
        yield

def add_lora(transformer, targets, args):
    """A LoRA (A from --seed, B zero: policy == reference at init) in fp32 beside the bf16 base; its parameters."""
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
        companion("--compile").compile_transformer(transformer)
    return params

def train_step(model, run, step):
    """Step `step`'s forwards and backwards, this process's groups in micro-batches: the gradient of the mean over
    the step's --groups-per-step groups; returns group_stats' sums over this process's groups."""
    args, (rank, world) = run.args, rank_and_world()
    transformer, G, M = getattr(model, "module", model), args.groups_per_step, args.micro_batch
    guidance = args.guidance if getattr(transformer.config, "guidance_embeds", False) else None
    velocity_fn = functools.partial(run.family.velocity, guidance=guidance)
    mine = range(step * G + rank * G // world, step * G + (rank + 1) * G // world)
    micro_batches = [mine[m:m + M] for m in range(0, len(mine), M)]
    stats = torch.zeros(len(STATS), device=run.device)
    for m, groups in enumerate(micro_batches):
        b = training_batch(run, groups)
        sync = model.no_sync() if world > 1 and m < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync, training_context(transformer):
            with torch.autocast("cuda", torch.bfloat16, enabled=run.device.type == "cuda"):
                err_policy, err_ref = velocity_errors(velocity_fn, model, b["x0"], b["cond"], b["t"], b["eps"])
            loss = gdro_loss(err_policy, err_ref, b["rewards"], args.beta, args.tau, args.gamma, args.normalize_rewards)
            # the micro-batch's share of the step's G groups; x world because DDP averages the processes' gradients
            (loss * len(groups) * world / G).backward()
        stats += group_stats(loss, err_policy, err_ref, b["rewards"])
    return stats

def log_line(window, step, args, t0):
    """A line of metrics.jsonl: the --log-every window's steps (each a dict of STATS' sums and grad_norm) pooled."""
    total = {k: sum(row[k] for row in window) for k in STATS}
    n, strict = total["groups"], total["strict"]
    return {"step": step, "loss": total["loss"] / n, "rank_acc": total["hits"] / strict if strict else None,
            "tied_groups": 1 - strict / n, "grad_norm": torch.stack([row["grad_norm"] for row in window]).mean().item(),
            "err_policy": total["err_policy"] / n, "err_ref": total["err_ref"] / n, "lr": args.lr,
            "time_s": round(time.time() - t0, 2)}

def train(transformer, run):
    """Phase 2: GDRO on the cache. Only the LoRA trains; the reference is the adapter switched off."""
    args, (rank, world) = run.args, rank_and_world()
    params = add_lora(transformer, run.family.lora_targets, args)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    start, last_ckpt = start_or_resume(args, transformer, optimizer)
    DDP = torch.nn.parallel.DistributedDataParallel  # under torchrun: it averages the LoRA's gradients
    model = DDP(transformer, broadcast_buffers=False) if world > 1 else transformer
    out, ckpt_dir, window, t0, step = Path(args.out), Path(args.out) / "checkpoints", [], time.time(), start
    bar = progress(range(start, args.max_steps), "GDRO training", "step", initial=start, total=args.max_steps)
    tracker = (companion("--report-to").report_to(args.report_to, out, start) if args.report_to != "none" and rank == 0
               else contextlib.nullcontext(lambda line: None))  # --report-to's TensorBoard or W&B: report(line)
    with bar, stop_when_done("finishing this step and saving a checkpoint") as stop, tracker as report:
        try:
            for step in bar:
                sums = train_step(model, run, step)
                shared = torch.cat([sums, torch.tensor([float(stop.is_set())], device=run.device)])
                if world > 1:
                    dist.all_reduce(shared)  # the log's sums, and whether any process was asked to stop
                *sums, stop_now = shared.tolist()  # the one host-device sync per step
                stats = dict(zip(STATS, sums))
                if not math.isfinite(stats["loss"]):
                    raise SystemExit(f"error: non-finite loss at step {step}; last good checkpoint: {last_ckpt}")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                window.append({**stats, "grad_norm": grad_norm})
                if done % args.log_every == 0 or done == args.max_steps:
                    line, window = log_line(window, done, args, t0), []
                    if rank == 0:
                        bar.set_postfix(loss=f"{line['loss']:.4f}", tied=f"{line['tied_groups']:.0%}",
                                        rank_acc="n/a" if line["rank_acc"] is None else f"{line['rank_acc']:.2f}",
                                        refresh=False)  # shown at the next redraw: a log file gets no extra line
                        append_line(out / "metrics.jsonl", json.dumps(line))
                        report(line)
                stop_now = stop_now if world > 1 else stop.is_set()  # alone, a Ctrl-C up to here counts
                if rank == 0 and (done % args.save_every == 0 or done == args.max_steps or stop_now):
                    last_ckpt = save_checkpoint(ckpt_dir, done, run.pipeline_class, transformer, optimizer)
                if stop_now:
                    barrier()
                    raise SystemExit(f"interrupted after step {done}; saved {ckpt_dir / f'step_{done:06d}'}; "
                                     "continue with the same command and --resume")
        except KeyboardInterrupt:  # a second signal: the step in flight is discarded
            raise SystemExit(f"interrupted during step {step + 1}, which was discarded; last checkpoint: {last_ckpt}")
    if rank == 0:
        save_lora(run.pipeline_class, transformer, out / "lora")
    barrier()
    return out / "lora"

# ============================================================================= 6. plumbing: processes, signals

class BadInput(SystemExit):
    """A refused input: one line on stderr naming the flag, file or line, exit code 2 (argparse's convention)."""
    def __init__(self, message):
        super().__init__(2)
        self.args = (message,)  # str(e) is the message; e.code stays 2

def cli(main):
    """How every script of the project ends: the exit codes of this file's docstring, and no traceback on a refusal."""
    try:
        main()
    except BadInput as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def init_distributed():
    """This process's device; torchrun's WORLD_SIZE, RANK, LOCAL_RANK start NCCL (CUDA) or gloo (CPU)."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def is_main_process():
    """Rank 0; before the process group starts, torchrun's RANK says it (the settings print once)."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0

def barrier():
    if dist.is_initialized():
        dist.barrier()

class LogBar(tqdm):
    """progress's bar in a log file (stderr not a terminal): each redraw a line, not a carriage-return overwrite."""
    def display(self, msg=None, pos=None):
        print(msg or self, file=sys.stderr, flush=True)

def progress(iterable, desc, unit, **kwargs):
    """tqdm on the main process; in a log file, a line every 5 %."""
    bar, total = tqdm, kwargs.get("total") or (len(iterable) if hasattr(iterable, "__len__") else 20)
    if not sys.stderr.isatty():  # no redraws driven by time either (maxinterval)
        bar, kwargs = LogBar, {"miniters": max(1, total // 20), "maxinterval": math.inf, **kwargs}
    return bar(iterable, desc=desc, unit=unit, **{"disable": not is_main_process(), **kwargs})

@contextlib.contextmanager
def stop_when_done(doing):
    """A first Ctrl-C, SIGTERM or SIGUSR1 sets the yielded Event (finish, save, stop); a second interrupts at once."""
    stop = threading.Event()
    def handler(signum, _):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if is_main_process():
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: {doing}, then stopping (Ctrl-C again to stop at once)", file=sys.stderr)
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handler) for s in signals} if main_thread else {}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

# ------------------------------------------------------------------------------ files: crash-safe, locked, hashed

def write_failed(path, e):
    what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only"}.get(e.errno, e.strerror)
    return SystemExit(f"error: cannot write {path}: {what}. Free space or fix the folder, then rerun the same "
                      "command: finished cache shards and the last complete checkpoint are kept")

def write_atomic(path, data):
    """Write bytes to path, making its folder: a kill at any moment leaves the old file or the new, never a torn one."""
    path, tmp = Path(path), Path(path).with_name(f".{Path(path).name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failed(path, e)

def append_line(path, line):
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise write_failed(path, e)

def lock_out(out, create=True):
    """One run per --out: a lock on OUT/.lock (create=False: only if OUT exists), held while the returned file is open
    and dropped however the process ends. Returns that file (True on the other processes), or None if not taken."""
    lock, holder = None, None
    if is_main_process() and (create or Path(out).is_dir()):
        try:
            import fcntl  # imported here, so that the method's block imports on any OS
        except ImportError:
            raise BadInput("--out: a run folder's lock needs fcntl (Linux, macOS); on Windows, run gdro.py in WSL")
        Path(out).mkdir(parents=True, exist_ok=True)
        lock = open(Path(out) / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.truncate(0)
            print(os.getpid(), file=lock, flush=True)
        except BlockingIOError:
            lock.seek(0)
            holder, lock = lock.read().strip() or "unknown", lock.close()
    if dist.is_initialized():  # every process learns whether rank 0 took it
        shared = [(holder, lock is not None)]
        dist.broadcast_object_list(shared, src=0)
        holder, lock = shared[0][0], lock or shared[0][1] or None
    if holder is not None:
        raise BadInput(f"--out {out} is in use by another run (PID {holder}); wait for it to end, or use another --out")
    return lock

def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

SHA256_FILE = "sha256.json"  # in a checkpoint or LoRA folder: the SHA-256 of its other files, written last

def record_sha256(folder):
    hashes = {p.name: file_sha256(p) for p in sorted(Path(folder).iterdir())
              if p.is_file() and p.name != SHA256_FILE and not p.name.startswith(".")}
    write_atomic(Path(folder) / SHA256_FILE, json.dumps(hashes, indent=2).encode())

def damaged_file(folder, names):
    """The first of `names` in folder that is not what sha256.json recorded, or None."""
    record = Path(folder) / SHA256_FILE
    if not record.is_file():
        return None
    try:
        hashes = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return record
    paths = (Path(folder) / name for name in names if name in hashes)
    return next((p for p in paths if not p.is_file() or file_sha256(p) != hashes[p.name]), None)

# ------------------------------------------------------------------------------ input files: each line checked

def read_lines(path, flag, what="one prompt per line"):
    """[(line number, stripped text)] of a text file's non-blank lines: UTF-8 (a byte order mark is dropped), no NUL
    byte; refused in one line naming the flag, the file and the line at fault."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{flag} {path} is a folder; expected a text file with {what}" if path.is_dir()
                       else f"{flag} {path}: file not found")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise BadInput(f"{flag} {path}: cannot read it ({e.strerror})")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BadInput(f"{flag} {path} is not UTF-8 text (line {line}, byte {e.start}); save it as UTF-8")
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise BadInput(f"{flag} {path} is binary, not text (line {line} holds a NUL byte)")
    return [(i, s.strip()) for i, s in enumerate(text.lstrip("\ufeff").splitlines(), 1) if s.strip()]

def read_prompts(path, reward, max_prompts=None):
    """Non-blank lines of the prompt file, each checked by --reward ocr (a quoted target) or geneval (its grammar)."""
    lines = read_lines(path, "--prompts")[:max_prompts]
    if not lines:
        raise BadInput(f"--prompts {path} has no prompts")
    fault = reward in ("ocr", "geneval") and companion(f"--reward {reward}", f"reward_{reward}").bad_prompt_lines(lines)
    if fault:
        raise BadInput(f"--prompts {path}: {fault}")
    return [prompt for _, prompt in lines]

# ------------------------------------------------------------------------------ cache shards (section 4's layout)

def shard_path(cache_dir, i):
    return Path(cache_dir) / f"prompt_{i:06d}.safetensors"

def write_shard(cache_dir, i, prompt, tensors, **metadata):
    """A safetensors file whose header records the prompt and the SHA-256 of the tensors' bytes (what follows the
    header): serialised once, then the header rewritten with the hash (the tensors' offsets do not change)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = safetensors_bytes(tensors, metadata={"prompt": prompt, **metadata})
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:header_end])
    header["__metadata__"]["sha256"] = hashlib.sha256(data[header_end:]).hexdigest()
    header = json.dumps(header, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    write_atomic(shard_path(cache_dir, i), len(header).to_bytes(8, "little") + header + data[header_end:])

def read_shard(cache_dir, i):
    """One prompt's group: {x0, rewards, prompt_embeds, ...} as CPU tensors (check_cache checked its SHA-256)."""
    return load_file(shard_path(cache_dir, i))

def check_cache(cache_dir, prompts):
    """([P] group sizes, mean reward) from every shard's header and rewards; checks each one's prompt, and this
    process's share of the shards whole against the SHA-256 written with them: once a run, not at each read."""
    (rank, world), sizes, total = rank_and_world(), [], 0.0
    for i, prompt in enumerate(progress(prompts, "check cache", "shard", disable=len(prompts) < 1000)):
        path = shard_path(cache_dir, i)
        try:
            with safe_open(path, "pt") as f:
                found, rewards = f.metadata() or {}, f.get_tensor("rewards")
        except Exception as e:
            raise SystemExit(f"error: cache shard {path} is unreadable ({str(e).splitlines()[0]}); delete it and rerun "
                             "the same command to regenerate it")
        if found.get("prompt") != prompt:
            raise SystemExit(f"error: cache shard {path} holds prompt {found.get('prompt')!r} but line {i + 1} of the "
                             f"prompts is {prompt!r}; use another --out or delete {cache_dir}")
        data = path.read_bytes() if i % world == rank and "sha256" in found else None  # 7 ms for a 10 MB SD3.5 shard
        if data and hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest() != found["sha256"]:
            raise SystemExit(f"error: cache shard {path} is damaged (not the SHA-256 written with it); delete it and "
                             "rerun the same command (with --resume once training has started) to regenerate it")
        sizes.append(len(rewards))
        total += float(rewards.sum())
    return sizes, total / sum(sizes)

def cache_interrupted(cache_dir, prompts):
    done = sum(shard_path(cache_dir, i).exists() for i in range(len(prompts)))
    return SystemExit(f"interrupted; {done} of {len(prompts)} prompts are cached; rerun the same command to continue")

# ------------------------------------------------------------------------------ the run folder: checkpoints, resume

LORA_FILE = "pytorch_lora_weights.safetensors"  # the file diffusers' pipe.load_lora_weights(folder) reads

def save_lora(pipeline_class, transformer, folder):
    """folder/pytorch_lora_weights.safetensors in diffusers' format, and folder/sha256.json."""
    from peft.utils import get_peft_model_state_dict
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     weight_name=LORA_FILE, save_function=lambda weights, path: write_atomic(
                                         path, safetensors_bytes(weights, metadata={"format": "pt"})))
    record_sha256(folder)

def save_checkpoint(ckpt_dir, step, pipeline_class, transformer, optimizer):
    """OUT/checkpoints/step_NNNNNN/ (the LoRA, state.pt, last sha256.json) written whole, then renamed; then those
    older than the two newest drop state.pt (keeping their LoRA for eval's trend): a kill leaves a whole checkpoint."""
    final, tmp = Path(ckpt_dir) / f"step_{step:06d}", Path(ckpt_dir) / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_lora(pipeline_class, transformer, tmp)
    state = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, state)
    write_atomic(tmp / "state.pt", state.getvalue())
    record_sha256(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a LoRA-only leftover of an earlier run at this step
    os.replace(tmp, final)
    for old in sorted(Path(ckpt_dir).glob("step_*/state.pt"))[:-2]:
        if old.parent != final:
            old.unlink()
    return final

def checkpoints(ckpt_dir):
    """The checkpoints that --resume can start from (LoRA and state.pt), oldest first."""
    return [s.parent for s in sorted(Path(ckpt_dir).glob("step_*/state.pt")) if (s.parent / LORA_FILE).is_file()]

def start_or_resume(args, transformer, optimizer):
    """(first step, last checkpoint), the newest loaded with --resume; metrics.jsonl cut back to that step."""
    from peft.utils import set_peft_model_state_dict
    start, last_ckpt, out = 0, None, Path(args.out)
    if args.resume:
        last_ckpt = checkpoints(out / "checkpoints")[-1]
        set_peft_model_state_dict(transformer, {k.removeprefix("transformer."): v
                                                for k, v in load_file(last_ckpt / LORA_FILE).items()})
        state = torch.load(last_ckpt / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        if is_main_process():
            print(f"resumed from {last_ckpt} (step {start} of {args.max_steps})")
    if is_main_process():
        kept = []
        for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                if json.loads(line)["step"] <= start:
                    kept.append(line)
        write_atomic(out / "metrics.jsonl", "".join(f"{line}\n" for line in kept).encode())
    return start, last_ckpt

def check_out(out, args):
    """--out: a writable folder (or none yet) in no other run's use; a run in it continues only with --resume.
    Returns lock_out's lock when OUT exists already (else main takes it once the other checks pass)."""
    parent = next(p for p in [out, *out.parents] if p.exists())
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: {parent} is " + ("not a writable folder" if parent.is_dir() else
                                                       "a file, not a folder"))
    lock = lock_out(out, create=False)  # a run in OUT already: say so before anything else
    found = checkpoints(out / "checkpoints")
    if args.resume and not found:
        raise BadInput(f"--resume: {out / 'checkpoints'} holds no complete checkpoint; drop --resume to start "
                       "training (a finished cache is reused either way)")
    if not args.resume and found:
        raise BadInput(f"{out / 'checkpoints'} holds a run (newest {found[-1].name}); continue it with --resume, or "
                       "use another --out")
    if found and (damaged := damaged_file(found[-1], [LORA_FILE, "state.pt"])):
        then = (f"with --resume to continue from {found[-2].name}" if len(found) > 1 else
                "without --resume to train from the start (the cache is kept)")
        raise BadInput(f"checkpoint file {damaged} is damaged (not what its {SHA256_FILE} recorded when it was "
                       f"saved); delete {found[-1]} and rerun {then}")
    return lock

NOT_SHAPING = {"out", "resume", "max_steps", "log_every", "save_every", "dry_run", "compile", "rollout_batch",
               "grad_checkpointing", "report_to"}  # not what is learned: how long, how often to log or save, how fast
CANNOT_CHANGE = {"model", "tiny", "family", "resolution", "lora_rank"}  # fixed on --resume: the checkpoint's layers

def run_config(args, out, world):
    """config.json: the settings; on --resume the first run's, this resume and its changes added under "resumes"."""
    config, path = {**vars(args), "world_size": world}, out / "config.json"
    if not args.resume or not path.is_file():
        return config
    try:
        first = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"--resume: unreadable {path} ({e}); it records the first run's settings")
    changes = {k: [first.get(k), v] for k, v in config.items() if k not in NOT_SHAPING and first.get(k) != v}
    listed = ", ".join(f"{'--' + k.replace('_', '-') if k in vars(args) else k} {a} -> {b}"  # flag_value's inverse
                       for k, (a, b) in changes.items())
    if changes.keys() & CANNOT_CHANGE:
        raise BadInput(f"--resume with {listed}: a checkpoint cannot continue on another model, family, resolution or "
                       f"LoRA rank; resume with the first run's settings ({path}), or use another --out")
    if changes and is_main_process():
        print(f"--resume with changed settings: {listed}; the run is no longer what an uninterrupted one would be")
    step = int(checkpoints(out / "checkpoints")[-1].name.removeprefix("step_"))
    return {**first, "resumes": first.get("resumes", []) + [{"step": step, "changes": changes}]}

# ============================================================================= 7. main

def check_args(args, world):
    """One rule a flag, checked before anything loads or is written."""
    finite = lambda flag: flag_value(args, flag) is not None and math.isfinite(flag_value(args, flag))
    rules = [("--images-per-prompt", args.images_per_prompt >= 2, "at least 2"),
             ("--resolution", args.resolution >= RESOLUTION_FACTOR and args.resolution % RESOLUTION_FACTOR == 0,
              f"a positive multiple of {RESOLUTION_FACTOR} (the VAE's 8x and the 2x2 patches)"),
             ("--guidance", args.guidance is None or (finite("--guidance") and args.guidance >= 0), "finite and >= 0"),
             ("--rollout-batch", args.rollout_batch is None or args.rollout_batch >= 1, "at least 1"),
             *[(f, finite(f) and flag_value(args, f) >= 0, "finite and >= 0") for f in ("--beta", "--gamma")],
             ("--tau", finite("--tau") and args.tau >= 0, "finite and >= 0 (0 = hard ranking)"),
             ("--group-size", 2 <= args.group_size and (args.from_images or args.group_size <= args.images_per_prompt),
              "at least 2 and at most --images-per-prompt"),
             ("--groups-per-step", args.groups_per_step >= 1 and args.groups_per_step % world == 0,
              f"at least 1 and a multiple of the {world} processes"),
             *[(f, finite(f) and flag_value(args, f) > 0, "finite and > 0") for f in ("--lr", "--max-grad-norm")],
             *[(f, flag_value(args, f) >= 1, "at least 1")
               for f in ("--steps", "--micro-batch", "--lora-rank", "--log-every", "--save-every")],
             *[(f, flag_value(args, f) >= 0, ">= 0") for f in ("--max-steps", "--seed")],
             ("--max-prompts", args.max_prompts is None or args.max_prompts >= 1, "at least 1")]
    for flag, ok, must in rules:
        if not ok:
            raise BadInput(f"{flag} {flag_value(args, flag)}: must be {must}")
    extras = ("--quantize", "--quantize-rollouts", "--report-to", "--sampler", "--compile")  # families.py's checks
    asked = [flag for flag in extras if flag_value(args, flag) not in ("none", "euler", False)]
    if asked and (problem := companion(asked[0]).check_extras(args, QUANTIZE[args.quantize])):
        raise BadInput(problem)
    if (args.prompts is None) == (args.from_images is None):
        raise BadInput("give --prompts FILE (sample a cache) or --from-images DIR (your own images), one of them")
    if not args.from_images and not known_reward(args.reward):
        raise BadInput(f"--reward {args.reward!r}: expected ocr, geneval or an existing FILE.py:FUNCTION")

def known_reward(spec):
    """--reward names ocr, geneval, or an existing FILE.py:FUNCTION (gdro.py's and eval.py's one rule)."""
    path, _, name = spec.rpartition(":")
    return spec in ("ocr", "geneval") or (path.endswith(".py") and bool(name) and os.path.isfile(path))

def read_inputs(args):
    """(prompts, the image folder's groups or None, each prompt's group size), every line checked."""
    if not args.from_images:
        prompts = read_prompts(args.prompts, args.reward, args.max_prompts)
        return prompts, None, [args.images_per_prompt] * len(prompts)
    read_image_folder = companion("--from-images").read_image_folder
    try:  # DIR/metadata.jsonl read as strictly as a prompts file, and every image: a fault names its line
        prompts, groups = read_image_folder(args.from_images, read_lines, args.group_size, say=is_main_process())
    except ValueError as e:
        raise BadInput(str(e))
    return prompts[:args.max_prompts], groups[:args.max_prompts], [len(g) for g in groups[:args.max_prompts]]

def main(argv=None):
    """The whole run: python gdro.py ARGS, or gdro.main([ARGS...]) from Python; returns the LoRA folder."""
    args = settle_model(parse_args(argv))  # the settings, complete; nothing changes them after this line
    device = init_distributed()
    rank, world = rank_and_world()
    check_args(args, world)
    prompts, image_groups, sizes = read_inputs(args)
    plan = training_plan(args, sizes)
    if rank == 0:
        print("plan: " + ", ".join(f"{k} {v}" for k, v in plan.items()))
        if plan["prompt_coverage"] < 0.5:
            print(f"warning: training visits only {plan['prompt_coverage']:.0%} of the cached prompts; raise "
                  "--max-steps or --groups-per-step, or cache fewer prompts (--max-prompts)")
        if args.dry_run:
            print(json.dumps(plan))
    if args.dry_run:
        return None
    out, cache_dir = Path(args.out), Path(args.out) / "cache"
    lock = check_out(out, args)
    manifest = cache_manifest(args, cache_dir)
    cache_complete = all(shard_path(cache_dir, i).exists() for i in range(len(prompts)))
    reward_fn = None if cache_complete or args.from_images else load_reward(
        args.reward, args.geneval_detector, args.geneval_clip, args.tiny and out / "tiny_geneval")
    config = run_config(args, out, world)
    lock = lock or lock_out(out)  # held until main returns
    if rank == 0:  # the manifest and config describe the run on disk
        write_atomic(cache_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
        write_atomic(out / "config.json", json.dumps(config, indent=2).encode())
    barrier()

    model = None if args.tiny else args.model  # --quantize loads the transformer again from it
    pipe, family = load_pipeline(args.model, args.tiny, args.family, device,
                                 torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.quantize_rollouts:
        pipe.transformer = companion("--quantize").quantize(pipe.transformer, args.quantize, model, device)
    if not cache_complete:
        try:
            build_cache(pipe, family, prompts, reward_fn, cache_dir, args, image_groups)
        except KeyboardInterrupt:  # a second Ctrl-C: the prompts in flight are dropped
            raise cache_interrupted(cache_dir, prompts)
    sizes, mean_reward = check_cache(cache_dir, prompts)
    if rank == 0:
        print(f"cache: {len(prompts)} prompts, {sum(sizes)} images, mean reward {mean_reward:.4f}")

    run = Run(args, family, type(pipe), dict(pipe.scheduler.config), cache_dir, sizes, device)
    transformer = pipe.transformer
    del pipe  # training needs only the transformer: the text encoders and the VAE are released
    if args.quantize != "none" and not args.quantize_rollouts:  # the cache is the base's own; training's base is not
        transformer = companion("--quantize").quantize(transformer, args.quantize, model, device)
    gc.collect()
    torch.cuda.empty_cache()  # a no-op unless CUDA is in use
    lora_dir = train(transformer, run)
    if rank == 0:
        print(f"LoRA saved to {lora_dir} (load with pipe.load_lora_weights({str(lora_dir)!r}))")
    return lora_dir

if __name__ == "__main__":
    cli(main)
