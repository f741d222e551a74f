"""What GDRO costs, measured in one run: ratios on any machine; on a CUDA GPU also the real models' speed and memory.

    python -m experiments.bench          # a few minutes on CPU; on CUDA also SD3.5-Medium and FLUX.1-dev at real size
    python -m experiments.bench --quick      # CPU smoke (CI), about a minute: the same code on small configs
    python -m experiments.bench --samplers   # each rollout sampler's distance to a 200-step solution (tiny models, CPU)
    python -m experiments.bench --real flux.1-dev   # one real architecture only (a short GPU session)
    python -m experiments.bench --architectures   # every supported architecture on the meta device: parameters,
                                                  # LoRA, FLOPs

A progress line per measurement; the last line printed is one JSON object holding every figure:
  step_overhead         full gdro.train step / the transformer work inside it          target <= 1.10
  rollout_overhead      gdro.build_cache / bare pipeline calls making the same images   target <= 1.10
  ckpt_memory_ratio     peak memory of a training step, checkpointing on / off          target <= 0.60
  offline_amortization  transformer forward-equivalents per training image, online / GDRO (> 1: GDRO is cheaper)
  real                  every supported architecture (ARCHITECTURES) from its config on the meta device: parameters,
                        bf16 GiB, the rank-32 LoRA, FLOPs of a k = 6 step at 512 px and its estimated peak memory
                        per --quantize (bf16, int8, NF4 frozen weights) with the smallest 24 / 48 / 80 GB card each
                        fits
  measured_training     on CUDA, the other architectures (COMPUTED) at real size: gdro.train's default setting on a
                        random cache of their shapes, measured as measured's training settings are (step time, peak
                        memory, model TFLOP/s and its share of the matmul peak)
  measured              SD3.5-Medium and FLUX.1-dev with random weights (no download), end to end: seconds per
                        prompt group through gdro.build_cache for each sampler at the steps that give Euler's ODE
                        accuracy (measured on the tiny model), with and without --compile, and the fastest against
                        Euler; per training setting (TRAINING_SETTINGS: checkpointing, groups per micro-batch,
                        --compile) through gdro.train the step time, peak memory, model TFLOP/s and its share of the
                        matmul peak measured in the same run; one prompt's rollout in training steps. On CUDA at
                        real size (16 images, 10 steps, 512 px, k = 6, bf16), with the GPU targets met or missed
                        (FLUX.1-dev >= 0.45 of the matmul peak within 40 GiB; rollouts >= 1.5x Euler's); on CPU
                        the same code on small configs (figures that only show it runs).
Every measurement drives gdro.py's own functions (build_cache, train, train_step, velocity_errors, generate), never
a copy.
"""
import contextlib
import functools
import gc
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import experiments
import families
import gdro

# gdro.py's default recipe (SD3.5-Medium): 16 images per prompt, 10 steps, 512 px, k = 6, rank 32
DEFAULTS = gdro.settle_model(gdro.parse_args([]))
K = DEFAULTS.group_size  # images per group in the loss
# the CPU bench model (an SD3 transformer of the given width and depth) and the run it is measured on
BENCH = {"full": dict(width=256, layers=4, resolution=256, prompts=2, images=8, sampler_steps=3, train_steps=9,
                      repeats=3, ocr_images=2),
         "quick": dict(width=128, layers=2, resolution=64, prompts=1, images=6, sampler_steps=2, train_steps=3,
                       repeats=1, ocr_images=0)}
# the sampler study: steps per sampler, measured against a REFERENCE_STEPS-step Euler solution
SAMPLER_STEPS = (2, 4, 6, 8, 10, 16)
REFERENCE_STEPS = 200
SAMPLER_PROMPTS = ("a red apple on a wooden table", 'a shop sign that reads "Open Late"', "a blue bird in the snow")
SAMPLER_SEEDS = (0, 1)
# the real architectures' run (the default rollout group, groups of k, training steps per measurement, the side of
# the matmul that measures the peak, the Euler reference that sets each sampler's steps: its steps and prompts) and
# its small CPU version (a shorter reference: Euler at 2 steps is far from both)
REAL_RUN = dict(images=DEFAULTS.images_per_prompt, steps=DEFAULTS.steps, resolution=gdro.PAPER_RESOLUTION, k=K,
                train_steps=6, matmul=8192, reference_steps=REFERENCE_STEPS, reference_prompts=len(SAMPLER_PROMPTS))
SMALL_RUN = dict(images=4, steps=2, resolution=64, k=2, train_steps=3, matmul=512, reference_steps=50,
                 reference_prompts=1)
# the training settings measured at real size: (checkpointing, groups per micro-batch, --compile); the first is
# gdro.py's default, the compiled one is compared with the same setting eager
TRAINING_SETTINGS = ((True, 1, False), (False, 1, False), (True, 2, False), (True, 4, False), (True, 2, True))
# the GPU targets (README "Memory and cost"): training with checkpointing fits PEAK_GIB; FLUX.1-dev, the paper's
# model, trains at a matmul_fraction of the measured matmul peak or more within its PEAK_GIB, and its rollout group
# is rollout_speedup times faster than Euler at gdro's default steps, at the same ODE accuracy
PEAK_GIB = {"sd3.5-medium": 16, "flux.1-dev": 40}
# bytes a frozen transformer parameter takes in training, per gdro.py --quantize: bf16 (2); torchao's int8
# weight-only, approximated as 1 (its bf16 scale per output row, 2 bytes a row of thousands of weights, left out);
# bitsandbytes' NF4, 4 bits and an fp32 absmax per 64-weight block, without double quantisation
WEIGHT_BYTES = {"none": 2, "int8": 1, "nf4": 0.5 + 4 / 64}
if list(WEIGHT_BYTES) != list(gdro.QUANTIZE):
    raise AssertionError(f"WEIGHT_BYTES {list(WEIGHT_BYTES)} != gdro.QUANTIZE {list(gdro.QUANTIZE)}")
QUANTIZE_LABEL = {"none": "bf16"}  # a --quantize's name in the tables (the others go by their own)
# the cards the architectures table fits each estimate to, in GB as sold (24, 48 and 80 GB cards hold about that many
# GiB); usable: 10 % less (the CUDA context, the allocator's fragmentation, the estimate's own error of up to 10 %)
CARD_GB = (24, 48, 80)
CARD_MARGIN = 0.10
TARGETS = {"flux.1-dev": dict(matmul_fraction=0.45, rollout_speedup=1.5)}
VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=16,
           sample_size=1024, use_quant_conv=False, use_post_quant_conv=False)  # both families': 8x down, 16 channels
# SD3.5-Medium and FLUX.1-dev: their transformer and VAE config.json, the output sizes of their text encoders (the
# tiny encoders are widened to them; depth stays tiny: rollouts need embeddings of the real shapes, not their
# meaning), and the shapes of one cached image and its conditioning at 512 px
REAL = {
    "sd3.5-medium": dict(
        family="sd3", hub_id="stabilityai/stable-diffusion-3.5-medium",
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        vae=dict(VAE, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoders=dict(text_encoder=dict(hidden_size=768, projection_dim=768),      # CLIP-L
                           text_encoder_2=dict(hidden_size=1280, projection_dim=1280),  # CLIP-G
                           text_encoder_3=dict(d_model=4096)),                          # T5-XXL
        shapes=dict(x0=(16, 64, 64), prompt_embeds=(77 + 256, 4096), pooled_prompt_embeds=(768 + 1280,))),
    "flux.1-dev": dict(
        family="flux", hub_id="black-forest-labs/FLUX.1-dev",
        transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        vae=dict(VAE, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoders=dict(text_encoder=dict(hidden_size=768, projection_dim=768),  # CLIP-L
                           text_encoder_2=dict(d_model=4096)),                      # T5-XXL
        shapes=dict(x0=(32 * 32, 64), prompt_embeds=(512, 4096), pooled_prompt_embeds=(768,))),  # packed 2x2 patches
}
# The other supported architectures (transformer/config.json), computed on the meta device only
# (real_architectures): shapes of one cached image and its conditioning at 512 px, the text at its cached length. The
# measured ones need text encoders of the real output shapes, which bench.py builds for the two above.
FLUX2 = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256, mlp_ratio=3.0,
             axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6)
COMPUTED = {
    "sd3.5-large": dict(
        family="sd3", hub_id="stabilityai/stable-diffusion-3.5-large",
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                         num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
        shapes=dict(x0=(16, 64, 64), prompt_embeds=(77 + 256, 4096), pooled_prompt_embeds=(768 + 1280,))),
    "qwen-image": dict(
        family="qwen-image", hub_id="Qwen/Qwen-Image",
        transformer=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                         axes_dims_rope=(16, 56, 56)),
        shapes=dict(x0=(32 * 32, 64), prompt_embeds=(512, 3584), prompt_mask=(512,))),  # Qwen2.5-VL-7B
    "flux.2-dev": dict(
        family="flux2", hub_id="black-forest-labs/FLUX.2-dev",
        transformer=dict(FLUX2, num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                         guidance_embeds=True),
        shapes=dict(x0=(32 * 32, 128), prompt_embeds=(512, 3 * 5120))),  # Mistral-Small-3.1: 3 layers x 5120
    "flux.2-klein-4b": dict(
        family="flux2-klein", hub_id="black-forest-labs/FLUX.2-klein-4B",
        transformer=dict(FLUX2, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                         guidance_embeds=False),
        shapes=dict(x0=(32 * 32, 128), prompt_embeds=(512, 3 * 2560))),  # Qwen3-4B
    "flux.2-klein-9b": dict(
        family="flux2-klein", hub_id="black-forest-labs/FLUX.2-klein-9B",
        transformer=dict(FLUX2, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                         guidance_embeds=False),
        shapes=dict(x0=(32 * 32, 128), prompt_embeds=(512, 3 * 4096))),  # Qwen3-8B
    "z-image-turbo": dict(
        family="z-image", hub_id="Tongyi-MAI/Z-Image-Turbo",
        transformer=dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                         n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                         rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512]),
        shapes=dict(x0=(16, 64, 64), prompt_embeds=(512, 2560), prompt_mask=(512,))),  # Qwen3-4B
}
ARCHITECTURES = {**REAL, **COMPUTED}
TEXT_TOKENS = 64  # a masked prompt's real tokens in the meta count: an OCR prompt in its chat template
SMALL_VAE = dict(block_out_channels=(16,) * 4, layers_per_block=1, norm_num_groups=8)
SMALL = {  # REAL with few, narrow layers, for a CPU: the text encoders keep the real output sizes
    "sd3.5-medium": dict(transformer=dict(sample_size=8, num_layers=2, num_attention_heads=2,
                                          caption_projection_dim=128, pos_embed_max_size=16,
                                          dual_attention_layers=(0,)), vae=SMALL_VAE),
    "flux.1-dev": dict(transformer=dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=32,
                                        axes_dims_rope=(8, 12, 12)), vae=SMALL_VAE),
}
PROMPT = 'a shop sign that reads "Open Late"'  # the real architectures' rollout prompt

# ----------------------------------------------------------------------------- models


def architecture(name, small=False):
    """REAL[name], or its small CPU version: REAL with SMALL's settings laid over each part."""
    real = REAL[name]
    if not small:
        return real
    return {part: {**value, **SMALL[name].get(part, {})} if isinstance(value, dict) else value
            for part, value in real.items()}


def bench_spec(width, layers):
    """The CPU bench model: SD3.5-Medium's structure at a width and depth a CPU measures in minutes."""
    small = architecture("sd3.5-medium", small=True)
    return {**small, "transformer": {**small["transformer"], "num_layers": layers, "num_attention_heads": width // 64,
                                     "caption_projection_dim": width, "sample_size": 32, "pos_embed_max_size": 32,
                                     "dual_attention_layers": tuple(range(layers // 2))}}


@contextlib.contextmanager
def default_dtype(dtype):
    """Modules built inside are created in dtype: a 12 B-parameter model is never materialised in fp32 first."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build(cls, *args, device, dtype, seed=0, **kwargs):
    """cls(*args, **kwargs) with random weights (seeded), built directly on the device in dtype ("meta": nothing
    allocated), in eval mode; buffers a model makes in fp32 are cast to dtype, as from_pretrained(torch_dtype=...)
    leaves them."""
    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(device):
        model = cls(*args, **kwargs).eval()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return model


def build_transformer(spec, device, dtype, seed=0):
    """The spec's transformer, of the family's class (as in gdro's tiny pipeline), with random weights."""
    cls = type(families.build_tiny_pipeline(gdro.family_record(spec["family"])).transformer)
    return build(cls, **spec["transformer"], device=device, dtype=dtype, seed=seed)


def build_pipeline(spec, device, dtype, seed=0):
    """A pipeline of the spec's family with random weights: the spec's transformer and VAE, gdro's tiny pipeline's
    text encoders widened to the spec's output sizes, its tokenizers, and its scheduler on the real models' flow
    schedule (the family record's scheduler)."""
    tiny = families.build_tiny_pipeline(gdro.family_record(spec["family"]))
    parts = {**tiny.components, "transformer": build_transformer(spec, device, dtype, seed),
             "vae": build(type(tiny.vae), **spec["vae"], device=device, dtype=dtype, seed=seed)}
    for name, sizes in spec["text_encoders"].items():
        config = tiny.components[name].config
        parts[name] = build(type(tiny.components[name]), type(config).from_dict({**config.to_dict(), **sizes}),
                            device=device, dtype=dtype, seed=seed)
    pipe = type(tiny)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brightness(images, prompts):
    """A cheap reward (mean pixel value): rollouts are timed without the cost of a real reward."""
    return [float(np.asarray(im.convert("L")).mean()) / 255 for im in images]


def rollout_args(family, images, steps, resolution, sampler="euler"):
    """gdro.build_cache's settings: one prompt group of `images` images, the family's usual guidance."""
    return gdro.parse_args(["--reward", f"{Path(__file__)}:brightness", "--images-per-prompt", str(images),
                            "--steps", str(steps), "--resolution", str(resolution), "--sampler", sampler,
                            "--guidance", str(gdro.family_record(family).guidance)])


def train_args(out, family, steps, groups=1, micro_batch=1, ckpt=True, log_every=10, k=K, compile=False):
    """gdro.train's settings: groups of k images, the default LoRA and loss, one checkpoint at the end."""
    return gdro.parse_args(["--out", str(out), "--max-steps", str(steps), "--groups-per-step", str(groups),
                            "--micro-batch", str(micro_batch), "--group-size", str(k), "--log-every", str(log_every),
                            "--save-every", str(steps), "--guidance", str(gdro.family_record(family).guidance),
                            "--steps", str(DEFAULTS.steps),  # the rollouts' steps (FLUX.2's shift of t follows them)
                            "--grad-checkpointing" if ckpt else "--no-grad-checkpointing"] + ["--compile"] * compile)


def train(transformer, family, cache_dir, sizes, args, device):
    """gdro.train as gdro.main calls it, with the family's pipeline class and the real models' flow schedule."""
    import diffusers
    record = gdro.family_record(family)
    return gdro.train(transformer, family, getattr(diffusers, record.pipeline), record.scheduler, cache_dir, sizes,
                      args, device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

# ----------------------------------------------------------------------------- measuring


def stamp(device):
    # CPU: process CPU time (with one intra-op thread, --threads), so other users of a shared CPU stay out of the
    # figures; CUDA: wall time after a synchronize. Wall time is kept beside it for the record.
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() if device.type == "cuda" else time.process_time()), time.perf_counter()


def since(t0, device):
    return tuple(b - a for a, b in zip(t0, stamp(device)))


def seconds(run, device):
    t0 = stamp(device)
    run()
    return since(t0, device)[0]


def peak_memory(run, device):
    """(run's result, the most bytes it had allocated at once beyond what was allocated when it started).
    CUDA: max_memory_allocated. CPU has no peak counter, so torch.profiler records every allocation and free of
    torch's CPU allocator during run(); the running sum of their sizes peaks at the most memory run had live: the
    activations saved for backward, block recomputation, gradients, LoRA + AdamW state and temporaries."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = run()
        return result, torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, peak


def transformer_work(transformer, family, batch, guidance, device):
    """The transformer work of a training step and nothing else: gdro.velocity_errors (policy and reference
    forwards) and the policy's backward, on a step's batch, as gdro.train_step runs them. autograd.grad leaves the
    LoRA's .grad untouched, so training goes on as if this had not run."""
    lora = [p for p in transformer.parameters() if p.requires_grad]
    velocity = functools.partial(gdro.family_record(family).velocity, guidance=guidance)
    with gdro.training_context(transformer):
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            err_policy, _ = gdro.velocity_errors(velocity, transformer, batch["x0"], batch["cond"], batch["t"],
                                                 batch["eps"])
        torch.autograd.grad(err_policy.sum(), lora)


def timed_training(transformer, family, cache_dir, sizes, args, device, bare_work=True):
    """gdro.train's loop, timed step by step: gdro.add_lora, then per step gdro.train_step (drawing the batches,
    both velocities, the loss, backward), the stats' host sync, clipping and AdamW, as gdro.train runs them; with
    bare_work, after each step the bare transformer work on that step's last micro-batch, so full steps and bare work
    alternate one to one. The first step (warm-up) is left out. Returns ([(full step, the bare work after the step
    before it, or None)], each time a (time, wall time) pair; the last step's loss)."""
    record = gdro.family_record(family)
    params = gdro.add_lora(transformer, record.lora_targets, args)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    guidance = args.guidance if getattr(transformer.config, "guidance_embeds", False) else None
    full, bare = [], []
    for step in range(args.max_steps):
        t0 = stamp(device)
        loss, groups, *_ = gdro.train_step(transformer, family, record.scheduler, cache_dir, sizes, step, args,
                                           device).tolist()  # the host sync gdro.train makes
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        full.append(since(t0, device))
        if bare_work:
            G, M = args.groups_per_step, args.micro_batch
            last = range(step * G + (G - 1) // M * M, (step + 1) * G)  # the step's last micro-batch
            batch = gdro.training_batch(cache_dir, sizes, last, args, family, record.scheduler, device)
            t0 = stamp(device)
            transformer_work(transformer, family, batch, guidance, device)
            bare.append(since(t0, device))
    return list(zip(full[1:], bare[:-1] if bare_work else [None] * (len(full) - 1))), loss / groups


def meta_step(spec, shapes, k=K, activations=False):
    """One group's training step through gdro.velocity_errors on the spec's transformer with the default LoRA, built
    on the meta device (nothing allocated, nothing run). Returns {"forward": the policy's and reference's FLOPs,
    "backward": the policy's (frozen base: input gradients and the LoRA's), "lora_params"}, counted by torch's
    FlopCounterMode; checkpointing's recomputation is not counted. With activations, also "saved_checkpointed" and
    "saved_per_block": the bytes autograd keeps for the backward with gradient checkpointing, and without it per
    checkpointed block (what one block's recomputation holds), both as built here in fp32."""
    family = spec["family"]
    transformer = build_transformer(spec, "meta", torch.float32)
    transformer.requires_grad_(False)
    from peft import LoraConfig  # imported where used: a refused flag answers before peft's long import
    transformer.add_adapter(LoraConfig(r=DEFAULTS.lora_rank, lora_alpha=DEFAULTS.lora_rank,
                                       target_modules=gdro.family_record(family).lora_targets))
    guidance = gdro.family_record(family).guidance if getattr(transformer.config, "guidance_embeds", False) else None
    with torch.device("meta"):
        x0, eps, t = torch.randn(1, k, *shapes["x0"]), torch.randn(1, *shapes["x0"]), torch.rand(1)
        cond = {name: torch.randn(1, *shape) for name, shape in shapes.items() if name not in ("x0", "prompt_mask")}
    if "prompt_mask" in shapes:  # which tokens are real is data, which the meta device has none of: a host tensor
        cond["prompt_mask"] = (torch.arange(shapes["prompt_mask"][0]) < TEXT_TOKENS).long()[None]
    velocity = functools.partial(gdro.family_record(family).velocity, guidance=guidance)
    run = lambda: gdro.velocity_errors(velocity, transformer, x0, cond, t, eps)[0]
    with FlopCounterMode(display=False) as forward:
        err_policy = run()
    with FlopCounterMode(display=False) as backward:
        err_policy.sum().backward()
    found = {"forward": forward.get_total_flops(), "backward": backward.get_total_flops(),
             "lora_params": sum(p.numel() for p in transformer.parameters() if p.requires_grad)}
    if activations:
        blocks = sum(len(m) for m in transformer.children() if isinstance(m, torch.nn.ModuleList))
        for checkpointed in (False, True):
            if checkpointed:
                transformer.enable_gradient_checkpointing()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel() * x.element_size()) or x,
                                                          lambda x: x):
                run()
            found["saved_checkpointed" if checkpointed else "saved_per_block"] = sum(saved) // (1 if checkpointed
                                                                                               else blocks)
    return found


def training_memory_gib(params, found, quantize="none"):
    """An estimate of a k-image training step's peak with checkpointing, from meta_step's counts: the frozen weights
    at WEIGHT_BYTES[quantize] a parameter (gdro.py --quantize: bf16, int8 or NF4), the LoRA in fp32 with its
    gradient and AdamW's two moments (16 bytes a parameter, never quantized), the checkpointed block inputs and one
    block's recomputation, in bf16 (autocast: half of the fp32 counted). Quantized, it counts every parameter at the
    quantized size, though only the linear layers are quantized (norms, embeddings and biases stay bf16): a small
    underestimate. Unquantized, against the H200's measured peaks (README) it is within 10 %: 7.1 vs 6.7 GiB for
    SD3.5-Medium, 28.4 vs 27.4 for FLUX.1-dev; the quantized ones are not measured."""
    activations = (found["saved_checkpointed"] + found["saved_per_block"]) / 2
    return (params * WEIGHT_BYTES[quantize] + found["lora_params"] * 16 + activations) / 2**30


def smallest_card(gib):
    """The smallest card of CARD_GB whose usable memory (CARD_MARGIN less) holds gib, or None if none does."""
    return next((gb for gb in CARD_GB if gib <= gb * (1 - CARD_MARGIN)), None)


def cached_shapes(cache_dir):
    """The shapes of one cached image and its conditioning, as training reads them."""
    shard = gdro.read_shard(cache_dir, 0)
    return {"x0": tuple(shard["x0"].shape[1:]),
            **{name: tuple(value.shape) for name, value in shard.items() if name not in ("x0", "rewards", "seeds")}}


def matmul_tflops(device, n, repeats=20):
    """The device's dense matmul throughput, measured: n x n x n products in bf16 on CUDA (training's compute
    dtype), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    t0 = stamp(device)
    for _ in range(repeats):
        a @ b
    tflops = 2 * n ** 3 * repeats / since(t0, device)[0] / 1e12
    print(f"matmul peak: {tflops:.3g} TFLOP/s ({n}^3, {str(dtype).removeprefix('torch.')}, {device.type})")
    return tflops


def train_cost(flops):
    """Forward-equivalents of training one image: its policy and reference forwards, and the backward priced by
    its FLOPs in forwards."""
    return 2 + 2 * flops["backward"] / flops["forward"]


def offline_amortization(rollout_per_image, train_per_image, epochs):
    """Forward-equivalents per training image, online / GDRO. GDRO spreads its cache over the epochs it trains on
    it; an online method regenerates its images at the same sampler settings for every step."""
    return (rollout_per_image + train_per_image) / (rollout_per_image / epochs + train_per_image)


def relative_rms(x, reference):
    """Mean over images of RMS(x - reference) / RMS(reference)."""
    rms = lambda v: v.flatten(1).pow(2).mean(1).sqrt()
    return (rms(x - reference) / rms(reference)).mean().item()


def markdown_table(header, rows, align):
    """A markdown table: header and rows are lists of cells (printed with str); align has a letter per column, "l"
    (text) or "r" (figures)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(str(cell) for cell in cells) + " |" for cells in (header, rule, *rows))


# ----------------------------------------------------------------------------- the CPU ratios


def measure_rollout_overhead(pipe, prompts, args, repeats, work, device):
    """gdro.build_cache (encode, generate, decode, reward, write shards) against the bare pipeline calls that make
    the same images: same seeds, one call per prompt group on both sides. They take turns, in swapped order every
    other repeat, so that load changes and order effects hit both; the images are compared to show it is the same
    work. Returns (ratio, the last cache's folder, transformer rows per image)."""
    n = args.images_per_prompt

    def bare():
        return [image for i, prompt in enumerate(prompts) for image in pipe(
            prompt=prompt, num_images_per_prompt=n, height=args.resolution, width=args.resolution,
            generator=[torch.Generator().manual_seed(gdro.image_seed(args.seed, i, j, n)) for j in range(n)],
            num_inference_steps=args.steps, guidance_scale=args.guidance).images]

    pipe(prompt=prompts[0], num_inference_steps=1, height=args.resolution, width=args.resolution)  # warm-up, untimed
    times, images = {"bare": [], "cache": []}, []
    for rep in range(repeats):
        cache_dir = work / f"rollout_{rep}"
        runs = {"bare": lambda: images.append(bare()),
                "cache": lambda: gdro.build_cache(pipe, "sd3", prompts, brightness, cache_dir, args)}
        for name in (("bare", "cache") if rep % 2 == 0 else ("cache", "bare")):
            t0 = stamp(device)
            runs[name]()
            times[name].append(since(t0, device))
    ratios = [c[0] / b[0] for b, c in zip(times["bare"], times["cache"])]
    wall = [c[1] / b[1] for b, c in zip(times["bare"], times["cache"])]
    cached = [im for i in range(len(prompts)) for im in gdro.decode(pipe, "sd3", gdro.read_shard(cache_dir, i)["x0"])]
    diff = max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(images[-1], cached))
    rows = args.steps * (2 if pipe.do_classifier_free_guidance else 1)  # CFG: a conditional and an unconditional row
    print(f"rollout: build_cache / bare pipeline = {median(ratios):.3f} (per repeat {[round(r, 3) for r in ratios]}, "
          f"wall {[round(r, 3) for r in wall]}); same images: max pixel difference {diff}")
    return median(ratios), cache_dir, rows


def measure_step_overhead(spec, cache_dir, sizes, steps, work, device, dtype):
    transformer = build_transformer(spec, device, dtype)
    args = train_args(work / "step", spec["family"], steps, ckpt=device.type == "cuda")
    pairs, _ = timed_training(transformer, spec["family"], cache_dir, sizes, args, device)
    ratios, wall = [f[0] / b[0] for f, b in pairs], [f[1] / b[1] for f, b in pairs]
    print(f"step: full / transformer work = {median(ratios):.3f} (median of {len(ratios)} adjacent pairs, range "
          f"{min(ratios):.3f}-{max(ratios):.3f}, {median(b[0] for _, b in pairs):.3f} s of work each; wall-time "
          f"median {median(wall):.3f})")
    return median(ratios)


def measure_ckpt_memory(spec, cache_dir, sizes, work, device, dtype):
    peaks = {}
    for ckpt in (False, True):  # one whole gdro.train step each, on a fresh transformer
        transformer = build_transformer(spec, device, dtype)
        args = train_args(work / f"memory_{ckpt}", spec["family"], 1, ckpt=ckpt)
        run = functools.partial(train, transformer, spec["family"], cache_dir, sizes, args, device)
        _, peaks[ckpt] = peak_memory(run, device)
        del transformer
        free_memory(device)
    print(f"memory: peak of a training step beyond weights and cache: {peaks[False] / 2**20:.1f} MiB without "
          f"checkpointing, {peaks[True] / 2**20:.1f} MiB with; ratio {peaks[True] / peaks[False]:.3f}")
    return peaks[True] / peaks[False]


def cost_ratios(s, work, device, dtype):
    """The four ratios on the bench model: step_overhead, rollout_overhead, ckpt_memory_ratio, offline_amortization."""
    model = bench_spec(s["width"], s["layers"])
    pipe = build_pipeline(model, device, dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"bench model: SD3 transformer width {s['width']}, {s['layers']} layers, {params / 1e6:.1f} M parameters, "
          f"{s['resolution']} px, k = {K}, on {device.type}")
    prompts = [f'a shop sign that reads "Offer {i}"' for i in range(s["prompts"])]
    args = rollout_args("sd3", s["images"], s["sampler_steps"], s["resolution"])
    rollout_overhead, cache_dir, rows_per_image = measure_rollout_overhead(pipe, prompts, args, s["repeats"], work,
                                                                           device)
    del pipe
    free_memory(device)
    sizes, _ = gdro.check_cache(cache_dir, prompts)
    step_overhead = measure_step_overhead(model, cache_dir, sizes, s["train_steps"], work, device, dtype)
    ckpt_memory_ratio = measure_ckpt_memory(model, cache_dir, sizes, work, device, dtype)
    train_per_image = train_cost(meta_step(model, cached_shapes(cache_dir)))
    epochs = s["train_steps"] * K / sum(sizes)  # one group of K images per step
    amortization = offline_amortization(rows_per_image, train_per_image, epochs)
    print(f"amortization: per training image GDRO {rows_per_image / epochs + train_per_image:.2f} forward-equivalents "
          f"(cache {rows_per_image} per image / {epochs:.2f} epochs + step {train_per_image:.2f}), online "
          f"{rows_per_image + train_per_image:.2f}; ratio {amortization:.2f}")
    return {"step_overhead": step_overhead, "rollout_overhead": rollout_overhead,
            "ckpt_memory_ratio": ckpt_memory_ratio, "offline_amortization": amortization}


def measure_ocr(n_images, name, gen_s_per_image, device):
    # build_cache scores each prompt's images in a worker thread while the next prompt generates, so OCR adds to a
    # rollout only where it is slower than generating. Timed alone here, on 512-px renderings of text.
    if importlib.util.find_spec("easyocr") is None:
        print("ocr: skipped (EasyOCR is not installed; pip install -r requirements.txt)")
        return None
    from reward_ocr import OcrReward, render_text
    try:
        reward = OcrReward(device=device)
    except Exception as e:  # no weights and no network: the bench goes on without this figure
        print(f"ocr: skipped (EasyOCR did not load: {type(e).__name__}: {e})")
        return None
    texts = ["Open Late", "Coffee First", "GDRO", "Hello World"][:n_images]
    images = [render_text(text) for text in texts]
    reward(images[:1], ['a sign that says "warm-up"'])
    t0 = stamp(device)
    scores = reward(images, [f'a sign that says "{text}"' for text in texts])
    s = since(t0, device)[0] / len(images)
    print(f"ocr: {s:.3f} s per 512-px image on {device.type} (scores {scores}); {name}'s rollout (above) takes "
          f"{gen_s_per_image:.3f} s per image: build_cache hides whichever is shorter")
    return s

# ----------------------------------------------------------------------------- samplers


@functools.cache
def distance_to_reference(family, prompts, seeds, reference_steps):
    """distance(sampler, steps): the relative RMS distance of the sampler's latents of every prompt x seed, on the
    tiny model of the family, to a `reference_steps`-step Euler solution of the same ODE. Each image comes from its
    own seeded noise (gdro.generate), so every solve starts from the same noise. Cached (arguments without defaults,
    so that equal calls share a key): the reference is solved once per family, and the sampler study and
    equal_accuracy_steps measure against the same one."""
    pipe = families.build_tiny_pipeline(gdro.family_record(family))
    pipe.set_progress_bar_config(disable=True)
    config, guidance = dict(pipe.scheduler.config), gdro.family_record(family).guidance
    encoded = [gdro.encode_prompt(pipe, family, prompt) for prompt in prompts]

    def solve(sampler, n):
        pipe.scheduler = families.make_scheduler(gdro.SAMPLERS[sampler], config)
        return torch.cat([gdro.generate(pipe, cond, uncond, seeds, n, guidance, families.TINY_RUN["resolution"])
                          for cond, uncond in encoded])

    reference = solve("euler", reference_steps)
    return lambda sampler, n: relative_rms(solve(sampler, n), reference)


def sampler_distances(family, samplers=tuple(gdro.SAMPLERS), steps=SAMPLER_STEPS, reference_steps=REFERENCE_STEPS,
                      prompts=SAMPLER_PROMPTS, seeds=SAMPLER_SEEDS):
    """{sampler: {steps: distance}}: the relative RMS distance of each sampler's latents, on the tiny model of the
    family, to a `reference_steps`-step Euler solution of the same ODE from the same noise."""
    distance, found = distance_to_reference(family, tuple(prompts), tuple(seeds), reference_steps), {}
    for sampler in samplers:
        found[sampler] = {}
        for n in steps:
            found[sampler][n] = distance(sampler, n)
            print(f"samplers {family} {sampler} {n} steps: {found[sampler][n]:.4f}")
    return found


def equal_accuracy_steps(family, steps, reference_steps=REFERENCE_STEPS, prompts=len(SAMPLER_PROMPTS)):
    """{sampler: the fewest steps at which it is as close to a `reference_steps`-step Euler solution (of the first
    `prompts` SAMPLER_PROMPTS) as Euler is at `steps`}, on the tiny model of the family (README "Samplers"; a trained
    model's figures may differ)."""
    distance = distance_to_reference(family, SAMPLER_PROMPTS[:prompts], SAMPLER_SEEDS, reference_steps)
    target, found = distance("euler", steps), {"euler": steps}
    for sampler in [name for name in gdro.SAMPLERS if name != "euler"]:
        n = 1
        while n < reference_steps and distance(sampler, n) > target:
            n += 1
        found[sampler] = n
    return found


def samplers_report():
    found = {}
    for family in ("sd3", "flux"):
        found[family] = sampler_distances(family)
        side, guidance = families.TINY_RUN["resolution"], gdro.family_record(family).guidance
        print(f"\ntiny {family} ({side} px, guidance {guidance}): relative "
              f"RMS distance of the latents to a {REFERENCE_STEPS}-step Euler solution from the same noise, "
              f"{len(SAMPLER_PROMPTS)} prompts x {len(SAMPLER_SEEDS)} seeds\n")
        rows = [[sampler, *(f"{row[n]:.4f}" for n in SAMPLER_STEPS)] for sampler, row in found[family].items()]
        print(markdown_table(["sampler \\ steps", *SAMPLER_STEPS], rows, "l" + "r" * len(SAMPLER_STEPS)) + "\n")
    return {"reference_steps": REFERENCE_STEPS,
            "samplers": {f: {s: {str(n): round(d, 5) for n, d in row.items()} for s, row in table.items()}
                         for f, table in found.items()}}

# ----------------------------------------------------------------------------- the real architectures


def quantized(values, sep=" / "):
    """One cell for a figure per --quantize, in WEIGHT_BYTES' order: "7.1 / 5.0 / 4.1"; None for a card (none
    fits) is ">" the largest card; values None (not computed) is an empty cell."""
    if values is None:
        return ""
    return sep.join(f">{CARD_GB[-1]}" if values[q] is None else str(values[q]) for q in WEIGHT_BYTES)


def quantize_labels(sep=" / "):
    """The --quantize names as the tables head their figures: "bf16 / int8 / nf4"."""
    return sep.join(QUANTIZE_LABEL.get(q, q) for q in WEIGHT_BYTES)


def real_architectures(with_flops, names=None):
    """Per architecture of ARCHITECTURES (meta device: computed, not run): parameters, bf16 weight memory, the
    rank-32 LoRA's parameters and fp32 size; with_flops also the FLOPs of one k = 6 step at 512 px, its estimated
    peak memory with checkpointing per --quantize (training_memory_gib; est_train_gib: bf16's) and the smallest
    card of CARD_GB each fits (smallest_card; None: none)."""
    found = {}
    for name in names or ARCHITECTURES:
        spec = ARCHITECTURES[name]
        transformer = build_transformer(spec, "meta", torch.float32)
        params = sum(p.numel() for p in transformer.parameters())
        row = found[name] = {"family": spec["family"], "hub_id": spec["hub_id"], "params": params,
                             "bf16_weight_gib": round(params * 2 / 2**30, 2)}
        if with_flops:
            step = meta_step(spec, spec["shapes"], activations=True)
            row.update(lora_params=step["lora_params"], lora_mib=round(step["lora_params"] * 4 / 2**20, 1),
                       step_tflop=round((step["forward"] + step["backward"]) / 1e12, 1),
                       forward_tflop_per_image=round(step["forward"] / 2 / K / 1e12, 3),
                       est_train_gib_by_quantize={q: round(training_memory_gib(params, step, q), 1)
                                                  for q in WEIGHT_BYTES})
            row["est_train_gib"] = row["est_train_gib_by_quantize"]["none"]  # bf16, as before --quantize
            row["fits_card_gb"] = {q: smallest_card(gib) for q, gib in row["est_train_gib_by_quantize"].items()}
        print(f"{name}: {params / 1e9:.3f} B parameters, {row['bf16_weight_gib']} GiB of bf16 weights (computed)"
              + (f"; LoRA r{DEFAULTS.lora_rank} {row['lora_mib']} MiB; one k={K} 512-px step = {row['step_tflop']} "
                 f"TFLOP, est. {quantized(row['est_train_gib_by_quantize'])} GiB with checkpointing "
                 f"({quantize_labels()})" if with_flops else ""))
    return found


def measure_rollouts(pipe, family, prompt, run, steps_for, work, device):
    """Seconds per prompt group through gdro.build_cache for each sampler at its step count in steps_for (the same
    ODE accuracy); on CUDA again with the transformer compiled (families.compile_transformer, as --compile). Returns
    ({"steps": steps_for, "eager": {sampler: s}, "compiled": ... or None}, Euler's cache folder)."""
    def rollout(tag, sampler, steps):
        args = rollout_args(family, run["images"], steps, run["resolution"], sampler)
        return seconds(lambda: gdro.build_cache(pipe, family, [prompt], brightness, work / f"{tag}_{sampler}_{steps}",
                                                args), device)

    found = {"steps": steps_for, "eager": None, "compiled": None}
    for tag in ("eager", "compiled"):
        if tag == "compiled":
            if device.type != "cuda":
                print("  rollout compiled: skipped (torch.compile's GPU backend needs CUDA)")
                break
            families.compile_transformer(pipe.transformer)
        found[tag] = {}
        for sampler, steps in steps_for.items():
            rollout(f"warmup_{tag}", sampler, 2)  # untimed: kernels, autotuning, compiling
            found[tag][sampler] = round(rollout(tag, sampler, steps), 4)
            print(f"  rollout {tag} {sampler}, {steps} steps: {found[tag][sampler]:.3f} s per prompt group "
                  f"({run['images']} images, {run['resolution']} px)")
    return found, work / f"eager_euler_{steps_for['euler']}"


def rollout_speedup(rollout_s, baseline_s=None):
    """The fastest rollout against Euler at gdro's default steps, eager, in the same run (and against an earlier
    measurement, baseline_s, where given): {"fastest", "s", "vs_euler", "vs_baseline"}."""
    s, tag, sampler = min((s, tag, sampler) for tag in ("eager", "compiled")
                          for sampler, s in (rollout_s[tag] or {}).items())
    return {"fastest": f"{sampler} {rollout_s['steps'][sampler]} steps {tag}", "s": s,
            "vs_euler": round(rollout_s["eager"]["euler"] / s, 3),
            "vs_baseline": baseline_s and round(baseline_s / s, 3)}


def measure_training(spec, cache_dir, run, flops, peak_tflops, work, device, dtype, settings=TRAINING_SETTINGS,
                     overhead=False):
    """Per setting (of TRAINING_SETTINGS: checkpointing, groups per micro-batch, --compile) a fresh transformer of
    the spec through gdro.train on the cache: step time, peak memory (CUDA, weights included), model TFLOP/s (flops:
    one group's step) and its share of the matmul peak, the last loss; with overhead, the first setting's overhead
    over its transformer work; a compiled setting's loss against the same setting eager (same seed, same draws:
    equal up to kernel rounding). A setting that runs out of memory or fails is recorded, and the bench goes on.
    Returns {setting's key: its row}."""
    family, found = spec["family"], {}
    sizes, _ = gdro.check_cache(cache_dir, [PROMPT])
    for i, (ckpt, micro, compiled) in enumerate(settings):
        key = f"ckpt_{'on' if ckpt else 'off'}_m{micro}" + "_compiled" * compiled
        with_overhead = overhead and i == 0
        row = found[key] = {"checkpointing": ckpt, "micro_batch": micro, "compiled": compiled}
        if compiled and device.type != "cuda":
            row["skipped"] = "torch.compile's GPU backend needs CUDA"
            print(f"  training {key}: skipped ({row['skipped']})")
            continue
        args = train_args(work / key, family, run["train_steps"], groups=micro, micro_batch=micro, ckpt=ckpt,
                          k=run["k"], compile=compiled)
        transformer = None
        free_memory(device)
        try:  # building is inside: the largest architectures' weights alone may not fit
            transformer = build_transformer(spec, device, dtype)
            pairs, loss = timed_training(transformer, family, cache_dir, sizes, args, device, bare_work=with_overhead)
            step_s = median(f[0] for f, _ in pairs)
            tflops = flops * micro / step_s / 1e12
            row.update(step_s=round(step_s, 4), tflops=round(tflops, 4),
                       matmul_fraction=round(tflops / peak_tflops, 4),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                       loss=round(loss, 6))
            if with_overhead:
                row["step_overhead"] = round(median(f[0] / b[0] for f, b in pairs), 3)
            eager = found.get(key.removesuffix("_compiled"), {})
            if compiled and "loss" in eager:
                row["loss_vs_eager"] = round(abs(row["loss"] - eager["loss"]) / abs(eager["loss"]), 6)
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True
        except Exception as e:  # a compiler's failure, say: recorded in the figures, the other settings still run
            row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]
        del transformer
        if compiled:
            torch.compiler.reset()  # its compiled graphs hold on to the transformer
        free_memory(device)
        print(f"  training {key}: {row}")
    return found


def best_within_memory(training, peak_gib):
    """(setting, row) of the measured training setting with the largest share of the matmul peak within peak_gib."""
    fits = [(row["matmul_fraction"], key) for key, row in training.items()
            if "matmul_fraction" in row and row["peak_gib"] is not None and row["peak_gib"] <= peak_gib]
    return (max(fits)[1], training[max(fits)[1]]) if fits else (None, None)


def measure_real(name, small, peak_tflops, work, device, dtype):
    """One architecture end to end: rollouts (per sampler at the same ODE accuracy, eager and compiled), then
    training (per setting)."""
    real, run, started = architecture(name, small), SMALL_RUN if small else REAL_RUN, time.perf_counter()
    family = real["family"]
    steps_for = equal_accuracy_steps(family, run["steps"], run["reference_steps"], run["reference_prompts"])
    print(f"{name}{' (small config)' if small else ''}: random {str(dtype).removeprefix('torch.')} weights on "
          f"{device.type}; steps per sampler for the ODE accuracy of {run['steps']} Euler steps (tiny {family}): "
          f"{steps_for}")
    pipe = build_pipeline(real, device, dtype)
    rollout_s, cache_dir = measure_rollouts(pipe, family, PROMPT, run, steps_for, work / name, device)
    del pipe
    torch.compiler.reset()  # compiled graphs hold on to the rollout transformer
    free_memory(device)
    step = meta_step(real, cached_shapes(cache_dir), run["k"])
    flops = step["forward"] + step["backward"]  # one group's training step
    training = measure_training(real, cache_dir, run, flops, peak_tflops, work / name, device, dtype,
                                overhead=not small)  # the overhead at real size only
    step_s = training["ckpt_on_m1"].get("step_s")
    steps_per_rollout = rollout_s["eager"]["euler"] / step_s if step_s else None
    print(f"  one prompt's rollout ({run['images']} images, {run['steps']} Euler steps) = "
          f"{steps_per_rollout and round(steps_per_rollout, 2)} training steps of one k={run['k']} group "
          "(checkpointing on)")
    measured = gdro.MEASURED.get(real["hub_id"], {})  # before this bench's changes, on an H200
    baseline = None if small else measured.get("rollout_16x10")
    wall_s = round(time.perf_counter() - started, 1)
    print(f"  {name}: measured in {wall_s} s")
    return {"small_config": small, "wall_s": wall_s, "rollout_s": rollout_s,
            "rollout_speedup": rollout_speedup(rollout_s, baseline), "step_tflop": round(flops / 1e12, 6),
            "training": training, "rollout_in_training_steps": steps_per_rollout and round(steps_per_rollout, 3)}


def random_cache(spec, folder, n=REAL_RUN["images"], seed=0):
    """One prompt's cache of n random latents and conditioning of the spec's shapes: what training reads, for an
    architecture whose rollouts are not built here (random weights draw nothing worth scoring anyway)."""
    g = torch.Generator().manual_seed(seed)
    shard = {"x0": torch.randn(n, *spec["shapes"]["x0"], generator=g), "rewards": torch.rand(n, generator=g)}
    for key, shape in spec["shapes"].items():
        if key == "prompt_mask":
            shard[key] = (torch.arange(shape[0]) < TEXT_TOKENS).long()
        elif key != "x0":
            shard[key] = torch.randn(shape, generator=g)
    gdro.write_shard(folder, 0, PROMPT, shard)
    return folder


def measure_training_only(name, peak_tflops, work, device, dtype):
    """An architecture of COMPUTED on CUDA: gdro.train's default setting (the first of TRAINING_SETTINGS) on a random
    cache of its shapes, measured as measure_real measures it (measure_training): {"family", "step_tflop", the
    row}."""
    spec = COMPUTED[name]
    cache_dir = random_cache(spec, work / f"cache_{name}")
    step = meta_step(spec, cached_shapes(cache_dir), REAL_RUN["k"])
    flops = step["forward"] + step["backward"]
    print(f"{name}: training on a random cache of its shapes, k = {REAL_RUN['k']}, {flops / 1e12:.1f} TFLOP a step")
    (row,) = measure_training(spec, cache_dir, REAL_RUN, flops, peak_tflops, work / name, device, dtype,
                              settings=TRAINING_SETTINGS[:1]).values()
    return {"family": spec["family"], "step_tflop": round(flops / 1e12, 1), **row}


def print_tables(result):
    """The result's tables in markdown (README "Supported models" and "Memory and cost", docs/models.md): every
    architecture computed on the meta device; where measured, each training setting and each sampler's rollout."""
    tables = [markdown_table(
        ["model", "family", "params", "bf16 GiB", f"LoRA r{DEFAULTS.lora_rank} MiB", f"k={K} step TFLOP (512 px)",
         f"est. train GiB {quantize_labels('/')}", "fits GB"],  # fits: the smallest card, in the same order
        [[name, row["family"], f"{row['params'] / 1e9:.2f} B", row["bf16_weight_gib"], row.get("lora_mib", ""),
          row.get("step_tflop", ""), quantized(row.get("est_train_gib_by_quantize")),
          quantized(row.get("fits_card_gb"), "/")] for name, row in result["real"].items()],
        "llrrrrrr")]
    measured = result.get("measured", {})
    training = [(name, row) for name, m in measured.items() for row in m["training"].values()]
    training += list(result.get("measured_training", {}).items())
    if training:
        rows = []
        for name, row in training:
            failed = "OOM" if row.get("oom") else row.get("error") or row.get("skipped")
            figures = [failed, "", "", ""] if failed else [row[key] for key in
                                                           ("step_s", "peak_gib", "tflops", "matmul_fraction")]
            rows.append([name, "on" if row["checkpointing"] else "off", row["micro_batch"],
                         "yes" if row["compiled"] else "no", *figures])
        tables.append(markdown_table(["model", "checkpointing", "groups per micro-batch", "compiled", "step s",
                                      "peak GiB", "model TFLOP/s", "of matmul peak"], rows, "llrlrrrr"))
    if measured:
        rows = [[name, sampler, m["rollout_s"]["steps"][sampler], f"{s:.3f}",
                 "-" if m["rollout_s"]["compiled"] is None else f"{m['rollout_s']['compiled'][sampler]:.3f}"]
                for name, m in measured.items() for sampler, s in m["rollout_s"]["eager"].items()]
        tables.append(markdown_table(["model", "sampler", "steps (same ODE accuracy)", "s per prompt group",
                                      "compiled"], rows, "llrrr"))
    print("\n" + "\n\n".join(tables) + "\n")


def report_targets(measured, small):
    """Per architecture the fastest training setting within its memory limit and the fastest rollout, against the
    GPU targets where it has them (real size only: small configs' figures only show that the code runs)."""
    if small:
        print("GPU targets: not measured (small configs; they need real sizes on a CUDA GPU)")
        return
    verdict = lambda x, target: f" (target >= {target}: {'met' if x >= target else 'MISSED'})" if target else ""
    for name, m in measured.items():
        targets = TARGETS.get(name, {})
        key, row = best_within_memory(m["training"], PEAK_GIB[name])
        fraction = row["matmul_fraction"] if row else 0
        print(f"{name} training: " + (f"the fastest setting within {PEAK_GIB[name]} GiB is {key}, at {fraction:.3f} of "
                                      f"the matmul peak" if row else f"no setting fits in {PEAK_GIB[name]} GiB")
              + verdict(fraction, targets.get("matmul_fraction")))
        speedup = m["rollout_speedup"]
        print(f"{name} rollout: fastest {speedup['fastest']}, {speedup['s']:.3f} s per prompt group: "
              f"{speedup['vs_euler']}x Euler's {REAL_RUN['steps']} steps in this run, {speedup['vs_baseline']}x the "
              "earlier H200 figure"
              + verdict(speedup["vs_euler"], targets.get("rollout_speedup")))

# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = experiments.Parser(description="Measure what GDRO costs; the last line printed is one JSON object.")
    p.add_argument("--quick", action="store_true", help="CPU smoke (CI), about a minute: small configs everywhere")
    p.add_argument("--samplers", action="store_true", help="only the samplers' distance to a 200-step solution")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time then measures our work only)")
    p.add_argument("--real", choices=list(REAL), action="append",
                   help="measure only this real architecture (repeatable)")
    p.add_argument("--architectures", action="store_true",
                   help="only the table of every supported architecture, computed on the meta device (CPU, minutes)")
    args = p.parse_args(argv)
    experiments.check(("--threads", args.threads, experiments.AT_LEAST_1))
    only = [flag for flag in ("--samplers", "--architectures") if getattr(args, flag[2:])]
    for flag, given in (("--quick", args.quick), ("--real", args.real), *[(f, True) for f in only[1:]]):
        if only and given:  # each of --samplers and --architectures is a study of its own: nothing else applies
            raise gdro.BadInput(f"{only[0]} measures only that; drop {flag}")
    torch.set_num_threads(args.threads)
    if args.samplers:
        print(json.dumps(samplers_report()))
        return
    if args.architectures:
        real = real_architectures(with_flops=True)
        print_tables({"real": real})
        print(json.dumps(real))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as gdro.main
    small = args.quick or device.type != "cuda"
    s, run = BENCH["quick" if args.quick else "full"], SMALL_RUN if small else REAL_RUN
    with tempfile.TemporaryDirectory() as tmp:
        figures = cost_ratios(s, Path(tmp), device, dtype)
        result = {**{k: round(v, 4) for k, v in figures.items()}, "device": torch.cuda.get_device_name()
                  if device.type == "cuda" else "cpu", "torch": torch.__version__, "quick": args.quick}
        result["real"] = real_architectures(with_flops=not args.quick)
        peak = matmul_tflops(device, run["matmul"])
        result["matmul_peak_tflops"] = round(peak, 4)
        result["measured"] = {name: measure_real(name, small, peak, Path(tmp), device, dtype)
                              for name in args.real or REAL}
        if not small and not args.real:  # the other architectures: training at real size, where the GPU holds them
            result["measured_training"] = {name: measure_training_only(name, peak, Path(tmp), device, dtype)
                                           for name in COMPUTED}
    print_tables(result)
    name, first = next(iter(result["measured"].items()))
    gen_s_per_image = first["rollout_s"]["eager"]["euler"] / run["images"]
    result["ocr_s_per_image"] = measure_ocr(s["ocr_images"], name, gen_s_per_image, device) if s["ocr_images"] else None
    report_targets(result["measured"], small)
    for name, target in (("step_overhead", 1.10), ("rollout_overhead", 1.10), ("ckpt_memory_ratio", 0.60)):
        verdict = "met" if figures[name] <= target else "MISSED"
        print(f"{name:>20} {figures[name]:.3f}  (target <= {target:.2f}: {verdict})")
    print(f"{'offline_amortization':>20} {figures['offline_amortization']:.3f}  (online / GDRO forward-equivalents "
          "per training image)")
    print(json.dumps(result))


if __name__ == "__main__":
    gdro.cli(main)
