"""GDRO: Group-level Direct Reward Optimization for rectified-flow text-to-image models, in one file.

Paper: "GDRO: Group-level Reward Post-training Suitable for Diffusion Models" (arXiv 2601.02036).
The method runs in two phases, and this file reads top to bottom in that order:

  1. Offline rollout cache: the FROZEN base model draws a group of images per prompt once (any sampler;
     we use the model's own deterministic flow-matching Euler ODE), and an explicit reward scores them once.
  2. Offline training: at a random noise level t, the LoRA policy and the frozen reference (the same
     transformer with the adapter disabled) each predict the velocity of every cached image; the gap in
     their errors is a DPO-style implicit reward, and a Plackett-Luce cross-entropy ranks the whole group
     against a softmax of the explicit rewards (gdro_loss below, Eqs. 5-9).

    python gdro.py --prompts ocr.txt                                  # SD3.5-Medium, the paper's OCR setting
    python gdro.py --prompts ocr.txt --model black-forest-labs/FLUX.1-dev
    python gdro.py --prompts ocr.txt --tiny                           # tiny random model, CPU, ~1 minute

Equation numbers "Eq. N" are the paper's; "(m.N)" is item N of the method notes in the README.
"""
import argparse
import gc
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

# ----------------------------------------------------------------------------- config
# The paper's OCR setting (beta 12, tau 0.05, gamma 0.5, k 6 of 16 cached images, lr 3e-4, LoRA 32, 512 px).

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GDRO: offline group-level reward post-training of a LoRA.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", default="runs/gdro", help="output folder: cache/, checkpoints/, lora/, metrics.jsonl")
    p.add_argument("--model", default="stabilityai/stable-diffusion-3.5-medium", help="SD3/SD3.5 or FLUX.1: hub id or local folder")
    p.add_argument("--tiny", action="store_true", help="tiny random model of the same classes, no download; shrinks the run for CPU")
    p.add_argument("--family", default="sd3", choices=["sd3", "flux"], help="model family of --tiny (a real --model says its own)")
    p.add_argument("--reward", default="ocr", help="'ocr' (reward_ocr.py) or FILE.py:FUNCTION with fn(images, prompts) -> list[float]")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts of the file")
    # rollout cache
    p.add_argument("--images-per-prompt", type=int, default=16, help="images the frozen base model draws per prompt, once")
    p.add_argument("--resolution", type=int, default=512, help="image height and width in pixels")
    p.add_argument("--steps", type=int, default=10, help="ODE sampler steps per rollout")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (SD3) or distilled guidance (FLUX); default: the family's usual")
    p.add_argument("--rollout-batch", type=int, default=8, help="images generated per pipeline call")
    # loss (Eqs. 5-9)
    p.add_argument("--beta", type=float, default=12.0, help="implicit-reward scale, Eq. 5 (OCR 12, GenEval 6)")
    p.add_argument("--tau", type=float, default=0.05, help="temperature of the reward softmax, Eq. 7; 0 = hard ranking, Eq. 12")
    p.add_argument("--gamma", type=float, default=0.5, help="weight of the top-1 flow-matching stabiliser, Eq. 8 (OCR 0.5, GenEval 1.0)")
    p.add_argument("--group-size", type=int, default=6, help="k: images per group in the loss, drawn from one prompt's cache")
    p.add_argument("--normalize-rewards", action="store_true", help="z-score rewards within each group before /tau (not in the paper)")
    p.add_argument("--uniform-t", action="store_true", help="draw t uniformly instead of the base model's shifted logit-normal")
    # training
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps (the paper's OCR run peaks near 300)")
    p.add_argument("--groups-per-step", type=int, default=1, help="B: groups per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank on the transformer's attention projections")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="gradient checkpointing (default: on with CUDA)")
    p.add_argument("--log-every", type=int, default=10, help="steps between lines of metrics.jsonl")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed of rollouts (image j of prompt i uses seed+i*n+j) and of training")
    argv = sys.argv[1:] if argv is None else argv
    return shrink_if_tiny(p.parse_args(argv), argv, TINY_RUN)

TINY_RUN = dict(resolution=64, max_prompts=4, images_per_prompt=8, steps=4, rollout_batch=8,
                max_steps=20, lora_rank=8, log_every=5, save_every=10)

def shrink_if_tiny(args, argv, tiny_settings):
    """--tiny shrinks the run for CPU and says what it shrank; every flag given explicitly still wins."""
    if args.tiny:
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        shrunk = {k: v for k, v in tiny_settings.items() if "--" + k.replace("_", "-") not in given}
        vars(args).update(shrunk)
        if shrunk:
            print("--tiny: " + ", ".join(f"{k}={v}" for k, v in shrunk.items()))
    return args

# ----------------------------------------------------------------------------- models
# Two families, side by side. What differs: how prompts are encoded (SD3: two CLIPs + T5 and real CFG;
# FLUX: CLIP pooled + T5 and distilled guidance), the latent layout (FLUX packs 2x2 patches into a
# sequence; we cache latents in the layout the transformer consumes), and the transformer call.

DEFAULT_GUIDANCE = {"sd3": 4.5, "flux": 3.5}  # SD3.5-Medium's usual CFG; FLUX.1-dev's distilled guidance

def build_tiny_pipeline(family="sd3", seed=0):
    """A tiny random StableDiffusion3Pipeline or FluxPipeline of diffusers' real classes, built from configs
    with no download (tokenizers included). The same seed gives the same weights."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              T5Config, T5EncoderModel, T5TokenizerFast)
    # character-level tokenizers: every printable ASCII character is a token
    chars = [chr(c) for c in range(33, 127)]
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        clip_vocab.setdefault(c, len(clip_vocab)), clip_vocab.setdefault(c + "</w>", len(clip_vocab))
    clip_tok = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    t5_tok = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
                             + [(c, -2.0) for c in chars] + [("\u2581" + c, -2.0) for c in chars], extra_ids=0)
    clip = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    t5 = T5Config(vocab_size=len(t5_tok), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    vae_kw = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                  sample_size=64, use_quant_conv=False, use_post_quant_conv=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd3":
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16,
                    num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                    caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=AutoencoderKL(**vae_kw, scaling_factor=1.5305, shift_factor=0.0609),
                text_encoder=CLIPTextModelWithProjection(clip), tokenizer=clip_tok,
                text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=clip_tok,
                text_encoder_3=T5EncoderModel(t5), tokenizer_3=t5_tok)
        elif family == "flux":
            pipe = FluxPipeline(
                transformer=FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
                vae=AutoencoderKL(**vae_kw, scaling_factor=0.3611, shift_factor=0.1159),
                text_encoder=CLIPTextModel(clip), tokenizer=clip_tok,
                text_encoder_2=T5EncoderModel(t5), tokenizer_2=t5_tok)
        else:
            raise ValueError(f"unknown family {family!r}: expected 'sd3' or 'flux'")
    for module in pipe.components.values():  # models built from configs start in train mode (dropout on)
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe

def load_pipeline(model, tiny=False, family="sd3", device="cpu", dtype=torch.float32):
    """The pipeline named by `model` (hub id or local folder), or the tiny one; returns (pipe, family)."""
    from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
    if tiny:
        pipe = build_tiny_pipeline(family)
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot load model {model!r}: {str(e).splitlines()[0]}")
    if isinstance(pipe, FluxPipeline):
        family = "flux"
    elif isinstance(pipe, StableDiffusion3Pipeline):
        family = "sd3"
    else:
        raise SystemExit(f"error: {model!r} is a {type(pipe).__name__}; GDRO here supports SD3/SD3.5 and FLUX.1")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), family  # from_pretrained already cast to dtype; the tiny model stays fp32

def encode_prompt(pipe, family, prompt):
    """Text conditioning of one prompt: (cond, uncond). cond is cached for training; uncond (SD3's empty
    negative prompt for CFG) is only needed by rollouts. Tensors have a leading batch dimension of 1."""
    with torch.no_grad():
        if family == "sd3":
            pe, neg_pe, pooled, neg_pooled = pipe.encode_prompt(prompt, None, None, device=pipe.device)
            return ({"prompt_embeds": pe, "pooled_prompt_embeds": pooled},
                    {"negative_prompt_embeds": neg_pe, "negative_pooled_prompt_embeds": neg_pooled})
        pe, pooled, _ = pipe.encode_prompt(prompt, None, device=pipe.device)  # FLUX: guidance-distilled, no uncond
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}, {}

@torch.no_grad()
def generate(pipe, cond, uncond, seeds, steps, guidance, resolution):
    """Latents of len(seeds) images from the pipeline's own sampler, in the transformer's layout (FLUX: packed).
    cond/uncond hold one prompt (batch 1, broadcast) or one row per seed. One CPU generator per image, so an
    image depends on its seed only, not on the batching."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    embeds = {k: v.expand(len(seeds), *v.shape[1:]) for k, v in {**cond, **uncond}.items()}  # one row per image
    return pipe(**embeds, generator=generators, height=resolution,
                width=resolution, num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images

@torch.no_grad()
def decode(pipe, family, latents, resolution):
    """Latents in the transformer's layout -> list of PIL images."""
    if family == "flux":
        latents = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
    latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")

def velocity(transformer, family, x_t, t, cond, guidance):
    """v(x_t, t, c): the transformer's velocity prediction. x_t [N, ...] in the cached layout, t [N] in (0, 1)."""
    if family == "sd3":
        return transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    n, seq_len = x_t.shape[:2]
    side = math.isqrt(seq_len)  # square images: the packed latent is a side x side grid of 2x2 patches
    img_ids = torch.zeros(side, side, 3, device=x_t.device)  # FLUX's RoPE position ids: (0, row, col)
    img_ids[..., 1] = torch.arange(side, device=x_t.device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=x_t.device)[None, :]
    txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x_t.device)
    g = torch.full((n,), guidance, device=x_t.device) if transformer.config.guidance_embeds else None
    return transformer(hidden_states=x_t, timestep=t, guidance=g, encoder_hidden_states=cond["prompt_embeds"],
                       pooled_projections=cond["pooled_prompt_embeds"], txt_ids=txt_ids,
                       img_ids=img_ids.view(-1, 3), return_dict=False)[0]  # FLUX scales t and guidance by 1000 itself

def sample_t(n, scheduler_config, seq_len, generator, uniform=False):
    """t in (0, 1), drawn as the base model was trained: logit-normal(0, 1), then the scheduler's shift
    (SD3: fixed shift; FLUX: resolution-dependent exponential shift mu), so training sees the noise levels
    the sampler visits."""
    u = torch.rand(n, generator=generator) if uniform else torch.sigmoid(torch.randn(n, generator=generator))
    c = scheduler_config
    if c.get("use_dynamic_shifting"):
        slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
        mu = c["base_shift"] + slope * (seq_len - c["base_image_seq_len"])
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return c["shift"] * u / (1 + (c["shift"] - 1) * u)

# ----------------------------------------------------------------------------- rewards

def load_reward(spec):
    """'ocr' -> reward_ocr.OcrReward(); 'FILE.py:FUNCTION' -> that function. Either is fn(images, prompts)."""
    if spec == "ocr":
        from reward_ocr import OcrReward
        return OcrReward()
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not os.path.isfile(path):
        raise SystemExit(f"error: --reward {spec!r}: expected 'ocr' or an existing FILE.py:FUNCTION")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"error: --reward: {path} has no function {name!r}")
    return getattr(module, name)

def read_prompts(path, reward, max_prompts=None):
    """Non-blank lines of the prompt file. With the OCR reward every prompt needs a quoted target."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: prompt file {path} not found")
    lines = [(i, s.strip()) for i, s in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if s.strip()]
    lines = lines[:max_prompts]
    if not lines:
        raise SystemExit(f"error: prompt file {path} has no prompts")
    if reward == "ocr":
        from reward_ocr import ocr_target
        bad = []
        for i, prompt in lines:
            try:
                ocr_target(prompt)
            except ValueError:
                bad.append(str(i))
        if bad:
            raise SystemExit(f"error: {path}: line(s) {', '.join(bad[:20])} have no quoted text for the OCR reward")
    return [prompt for _, prompt in lines]

# ----------------------------------------------------------------------------- rollout cache
# OUT/cache/manifest.json says how the cache was made; OUT/cache/prompt_NNNNNN.safetensors holds one prompt's
# group: x0 [n, ...] (clean latents), rewards [n], seeds [n], and its text conditioning. Each shard is written
# to a temporary name and renamed, so an interrupted build resumes at the first missing shard.

def cache_manifest(args, family, scheduler):
    return {"model": "tiny-" + family if args.tiny else args.model, "family": family, "resolution": args.resolution,
            "images_per_prompt": args.images_per_prompt, "steps": args.steps, "guidance": args.guidance,
            "sampler": type(scheduler).__name__, "reward": args.reward, "seed": args.seed}

def check_manifest(cache_dir, manifest):
    """Write the manifest of a new cache, or refuse a cache that was made another way."""
    path = Path(cache_dir) / "manifest.json"
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: unreadable cache manifest {path}: {e}")
        diff = [f"{k}={found.get(k)!r} (now {v!r})" for k, v in manifest.items() if found.get(k) != v]
        if diff:
            raise SystemExit(f"error: cache {cache_dir} was built with {', '.join(diff)}; use another --out or delete it")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2))

def shard_path(cache_dir, i):
    return Path(cache_dir) / f"prompt_{i:06d}.safetensors"

def build_cache(pipe, family, prompts, reward_fn, cache_dir, args):
    """Phase 1: the frozen base model draws args.images_per_prompt images per prompt, the reward scores them.
    Scoring and writing prompt i run in a worker thread while prompt i+1 generates: OCR would otherwise leave
    the GPU idle for about as long as it generates (bench.py). A shard exists only once scored and written."""
    n = args.images_per_prompt
    Path(cache_dir).mkdir(parents=True, exist_ok=True)

    def score_and_save(i, x0, seeds, cond, images):
        rewards = [float(r) for r in reward_fn(images, [prompts[i]] * n)]
        if len(rewards) != n or not all(math.isfinite(r) for r in rewards):
            raise SystemExit(f"error: the reward returned {rewards} for {n} images of prompt {i}; expected {n} finite numbers")
        shard = {"x0": x0, "rewards": torch.tensor(rewards), "seeds": torch.tensor(seeds),
                 **{k: v[0] for k, v in cond.items()}}
        tmp = shard_path(cache_dir, i).with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, tmp, metadata={"prompt": prompts[i]})
        os.replace(tmp, shard_path(cache_dir, i))

    todo = [i for i in range(len(prompts)) if not shard_path(cache_dir, i).exists()]
    with ThreadPoolExecutor(max_workers=1) as scorer:
        scoring = None
        for i in tqdm(todo, desc="rollout cache", unit="prompt", initial=len(prompts) - len(todo), total=len(prompts)):
            cond, uncond = encode_prompt(pipe, family, prompts[i])
            seeds = [args.seed + i * n + j for j in range(n)]
            x0 = torch.cat([generate(pipe, cond, uncond, seeds[j:j + args.rollout_batch], args.steps, args.guidance,
                                     args.resolution) for j in range(0, n, args.rollout_batch)])
            images = decode(pipe, family, x0, args.resolution)
            if scoring is not None:
                scoring.result()  # at most one prompt in flight; re-raises the worker's error here
            scoring = scorer.submit(score_and_save, i, x0, seeds, cond, images)
        if scoring is not None:
            scoring.result()

def load_cache(cache_dir, prompts):
    """The whole cache as stacked CPU tensors: x0 [P, n, ...], rewards [P, n], and the conditioning [P, ...]."""
    shards = []
    for i, prompt in enumerate(prompts):
        try:
            with safe_open(shard_path(cache_dir, i), "pt") as f:
                found = f.metadata().get("prompt")
                shards.append({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:
            raise SystemExit(f"error: unreadable cache shard {shard_path(cache_dir, i)}: {e}")
        if found != prompt:
            raise SystemExit(f"error: cache shard {shard_path(cache_dir, i)} holds prompt {found!r}, the prompt file has "
                             f"{prompt!r} on that line; use another --out or delete the cache")
    return {k: torch.stack([s[k] for s in shards]) for k in shards[0]}

# ----------------------------------------------------------------------------- loss

def gdro_loss(err_policy, err_ref, rewards, beta=12.0, tau=0.05, gamma=0.5, normalize_rewards=False):
    """The GDRO loss (Eq. 9): Plackett-Luce soft cross-entropy over implicit rewards + top-1 stabiliser.

    err_policy: [B, k] per-image velocity error ||v - v_theta||^2 of the policy (mean over latent elements).
    err_ref:    [B, k] the same for the frozen reference; carries no gradient.
    rewards:    [B, k] explicit rewards (e.g. OCR accuracy); images may be in any order within a group.
    beta: implicit-reward scale; tau: reward temperature (0 = hard ranking, Eq. 12); gamma: stabiliser weight.
    normalize_rewards: z-score each group's rewards before /tau (an option; the paper uses raw rewards).
    Returns a scalar: the mean over the B groups.
    """
    order = rewards.argsort(dim=1, descending=True)  # sort each group best -> worst: r_1 >= ... >= r_k
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

# ----------------------------------------------------------------------------- training loop

def save_lora(pipeline_class, transformer, folder):
    """OUT/.../pytorch_lora_weights.safetensors in diffusers' format: pipe.load_lora_weights(folder) reads it."""
    from peft.utils import get_peft_model_state_dict
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     safe_serialization=True)

def save_checkpoint(ckpt_dir, step, pipeline_class, transformer, optimizer, generator):
    """OUT/checkpoints/step_NNNNNN/: the LoRA (diffusers format) + state.pt (optimizer, step, RNG). Written to
    a temporary folder and renamed; older checkpoints keep only their LoRA (for eval's trend)."""
    final, tmp = Path(ckpt_dir) / f"step_{step:06d}", Path(ckpt_dir) / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_lora(pipeline_class, transformer, tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": generator.get_state()}, tmp / "state.pt")
    for old in Path(ckpt_dir).glob("step_*/state.pt"):
        old.unlink()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final

def load_checkpoint(ckpt, transformer, optimizer, generator):
    from peft.utils import set_peft_model_state_dict
    lora = {k.removeprefix("transformer."): v for k, v in load_file(ckpt / "pytorch_lora_weights.safetensors").items()}
    set_peft_model_state_dict(transformer, lora)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"])
    return state["step"]

# the attention projections of the image and text streams (SD3 joint blocks, FLUX double and single blocks)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
METRICS = ("loss", "rank_acc", "grad_norm", "err_policy", "err_ref")  # metrics.jsonl, means over --log-every steps

def train(transformer, family, pipeline_class, scheduler_config, cache, args, device):
    """Phase 2: GDRO on the cache. Only the LoRA is trained; the reference is the adapter switched off."""
    from peft import LoraConfig
    transformer.requires_grad_(False)
    torch.manual_seed(args.seed)  # LoRA init (A random, B zero: the policy starts as the reference) follows --seed
    transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights and AdamW state in fp32; the frozen base stays in bf16 on CUDA
    if args.grad_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)  # CPU generator: groups, t and eps; saved in checkpoints
    out, ckpt_dir = Path(args.out), Path(args.out) / "checkpoints"
    start, last_ckpt = 0, None
    found = sorted(ckpt_dir.glob("step_*/state.pt"))
    if args.resume and found:
        last_ckpt = found[-1].parent
        start = load_checkpoint(last_ckpt, transformer, optimizer, generator)
        print(f"resumed from {last_ckpt} (step {start})")
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():  # keep the lines of the steps this run does not redo
        kept = [l for l in metrics_path.read_text().splitlines() if l and json.loads(l)["step"] <= start]
        metrics_path.write_text("".join(l + "\n" for l in kept))

    x0_all, rewards_all = cache["x0"], cache["rewards"]
    cond_all = {k: v for k, v in cache.items() if k not in ("x0", "rewards", "seeds")}
    n_prompts, n_images = rewards_all.shape
    B, k = args.groups_per_step, args.group_size
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")
    seq_len = x0_all.shape[2] if family == "flux" else None  # FLUX's shift depends on the image token count
    window, t0 = [], time.time()
    bar = tqdm(range(start, args.max_steps), desc="GDRO training", unit="step", initial=start, total=args.max_steps)
    try:
        for step in bar:
            # B groups: a prompt each, k of its cached images, ONE t and ONE eps shared by the group
            prompt_idx = torch.randint(n_prompts, (B,), generator=generator)
            image_idx = torch.stack([torch.randperm(n_images, generator=generator)[:k] for _ in range(B)])
            x0 = x0_all[prompt_idx[:, None], image_idx].to(device, torch.float32)  # [B, k, ...]
            rewards = rewards_all[prompt_idx[:, None], image_idx].to(device)  # [B, k]
            eps = torch.randn((B, 1, *x0.shape[2:]), generator=generator).to(device).expand_as(x0)
            t = sample_t(B, scheduler_config, seq_len, generator, args.uniform_t).to(device)
            t_ = t.view(B, 1, *[1] * (x0.dim() - 2))
            x_t = ((1 - t_) * x0 + t_ * eps).flatten(0, 1)  # x_t = (1 - t) x0 + t eps, fresh noise on cached x0
            v = (eps - x0).flatten(0, 1)  # target velocity
            t = t.repeat_interleave(k)
            cond = {name: c[prompt_idx].to(device).repeat_interleave(k, 0) for name, c in cond_all.items()}
            with autocast:  # policy first: on a GPU, the host's adapter switching below overlaps its kernels
                v_policy = velocity(transformer, family, x_t, t, cond, args.guidance)
                with torch.no_grad():  # the reference: the same weights with the adapter off, no second copy
                    transformer.disable_adapters()
                    v_ref = velocity(transformer, family, x_t, t, cond, args.guidance)
                    transformer.enable_adapters()
            err_policy = (v_policy.float() - v).pow(2).flatten(1).mean(1).view(B, k)  # fp32, mean over elements
            err_ref = (v_ref.float() - v).pow(2).flatten(1).mean(1).view(B, k)
            loss = gdro_loss(err_policy, err_ref, rewards, args.beta, args.tau, args.gamma, args.normalize_rewards)
            if not math.isfinite(loss.item()):  # the one host-device sync per step
                raise SystemExit(f"error: non-finite loss at step {step}; stopped. Last good checkpoint: {last_ckpt}")
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # did the implicit reward put (one of) the best image(s) first?
            s = -(err_policy - err_ref).detach()
            top1 = (rewards.gather(1, s.argmax(1, keepdim=True)) == rewards.max(1, keepdim=True).values).float()
            window.append(torch.stack([loss, top1.mean(), grad_norm, err_policy.mean(), err_ref.mean()]).detach())
            done = step + 1
            if done % args.log_every == 0 or done == args.max_steps:
                line = {"step": done, **dict(zip(METRICS, torch.stack(window).mean(0).tolist())),
                        "lr": args.lr, "time_s": round(time.time() - t0, 2)}
                bar.set_postfix(loss=f"{line['loss']:.4f}", rank_acc=f"{line['rank_acc']:.2f}")
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
                window = []
            if done % args.save_every == 0 or done == args.max_steps:
                last_ckpt = save_checkpoint(ckpt_dir, done, pipeline_class, transformer, optimizer, generator)
    except KeyboardInterrupt:  # keep what was learned: checkpoint the last finished step, then stop
        bar.close()
        if step > start:
            last_ckpt = save_checkpoint(ckpt_dir, step, pipeline_class, transformer, optimizer, generator)
        raise SystemExit(f"interrupted; saved {last_ckpt}; continue with --resume")
    save_lora(pipeline_class, transformer, out / "lora")
    return out / "lora"

# ----------------------------------------------------------------------------- main

def main(argv=None):
    """The whole run: python gdro.py ARGS, or gdro.main([ARGS...]) from Python; returns the LoRA folder."""
    args = parse_args(argv)
    if args.group_size < 2 or args.group_size > args.images_per_prompt:
        raise SystemExit(f"error: --group-size {args.group_size} must be in [2, --images-per-prompt {args.images_per_prompt}]")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("error: no CUDA GPU found; a real model needs one. Try the whole pipeline on CPU with --tiny")
    if args.grad_checkpointing is None:
        args.grad_checkpointing = device == "cuda"
    prompts = read_prompts(args.prompts, args.reward, args.max_prompts)  # bad input fails before heavy work
    out, cache_dir = Path(args.out), Path(args.out) / "cache"
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume and any((out / "checkpoints").glob("step_*/state.pt")):
        raise SystemExit(f"error: {out / 'checkpoints'} holds a run; continue it with --resume, or use another --out")
    cache_complete = all(shard_path(cache_dir, i).exists() for i in range(len(prompts)))
    reward_fn = None if cache_complete else load_reward(args.reward)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe, family = load_pipeline(args.model, args.tiny, args.family, device, dtype)
    args.family = family
    args.guidance = DEFAULT_GUIDANCE[family] if args.guidance is None else args.guidance
    (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    check_manifest(cache_dir, cache_manifest(args, family, pipe.scheduler))
    if not cache_complete:
        build_cache(pipe, family, prompts, reward_fn, cache_dir, args)
    cache = load_cache(cache_dir, prompts)
    print(f"cache: {len(prompts)} prompts x {args.images_per_prompt} images, mean reward {cache['rewards'].mean():.4f}")

    # training needs only the transformer: release the text encoders and the VAE
    transformer, pipeline_class, scheduler_config = pipe.transformer, type(pipe), dict(pipe.scheduler.config)
    del pipe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    lora_dir = train(transformer, family, pipeline_class, scheduler_config, cache, args, device)
    print(f"LoRA saved to {lora_dir} (load with pipe.load_lora_weights({str(lora_dir)!r}))")
    return lora_dir

if __name__ == "__main__":
    main()
