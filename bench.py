"""What GDRO costs, measured as ratios in one run (absolute times on a shared machine are noise).

    python bench.py            # mid-size SD3 transformer, a few minutes on CPU; on CUDA also the real architectures
    python bench.py --quick    # small version for CI smoke, under a minute

Figures (the last line printed is one JSON object holding them):
  step_overhead         full GDRO training step / the transformer work inside it        target <= 1.10
  rollout_overhead      gdro.build_cache / bare diffusers pipeline calls, same images    target <= 1.10
  ckpt_memory_ratio     peak memory of a training step, checkpointing on / off           target <= 0.60
  offline_amortization  transformer forward-equivalents per training image, online / GDRO (> 1: GDRO is cheaper)
Every measurement drives gdro.py's own functions (build_cache, train), never a copy of them.
"""
import argparse
import copy
import gc
import json
import statistics
import tempfile
import time

import diffusers
import numpy as np
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode

import gdro

FULL = dict(width=256, layers=4, resolution=128, prompts=2, images=8, sampler_steps=3, train_steps=9, repeats=3, ocr_images=2)
QUICK = dict(width=128, layers=2, resolution=64, prompts=1, images=6, sampler_steps=2, train_steps=3, repeats=1, ocr_images=0)
REAL = {  # the transformers of SD3.5-Medium and FLUX.1-dev (their diffusers config.json); shapes at 512 x 512
    "sd3.5-medium": ("sd3", "SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm"), dict(x=(16, 64, 64), prompt_embeds=(333, 4096), pooled_prompt_embeds=(2048,))),
    "flux.1-dev": ("flux", "FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56)), dict(x=(1024, 64), prompt_embeds=(512, 4096), pooled_prompt_embeds=(768,))),
}
PIPELINE = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}  # gdro.train saves the LoRA with it


def stamp(device):
    # CPU: process CPU time (with one intra-op thread, --threads), so other users of a shared CPU stay out of the
    # figures; CUDA: wall time after a synchronize. Wall time is kept beside it for the record.
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() if device == "cuda" else time.process_time()), time.perf_counter()


def since(t0, device):
    return tuple(b - a for a, b in zip(t0, stamp(device)))


def bench_pipeline(width, layers, resolution, device):
    """StableDiffusion3Pipeline: the tiny pipeline's text encoders, VAE and tokenizers, a mid-size SD3 transformer."""
    tiny = gdro.build_tiny_pipeline("sd3")
    torch.manual_seed(0)
    patches = resolution // tiny.vae_scale_factor // 2
    transformer = diffusers.SD3Transformer2DModel(sample_size=2 * patches, patch_size=2, in_channels=16, out_channels=16,
        num_layers=layers, attention_head_dim=64, num_attention_heads=width // 64, caption_projection_dim=width,
        joint_attention_dim=tiny.text_encoder_3.config.d_model, pooled_projection_dim=2 * tiny.text_encoder.config.projection_dim,
        pos_embed_max_size=max(16, patches))
    pipe = diffusers.StableDiffusion3Pipeline(**{**tiny.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def count_rows(transformer):
    """Counts transformer forward calls as batch rows (a CFG call of n images counts 2n) and keeps the last call's
    inputs; returns (counter, hook)."""
    counter = {"rows": 0, "on": True, "kwargs": None}
    def pre_hook(module, args, kwargs):
        if counter["on"]:
            counter["rows"] += kwargs["hidden_states"].shape[0]
            counter["kwargs"] = kwargs
    return counter, transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)


def measure_rollout(pipe, prompts, gargs, repeats, device):
    # build_cache (encode, generate, decode, cheap reward, write shards) against the bare pipeline calls that make the
    # same images (same seeds, one call per prompt on both sides: --rollout-batch = images per prompt). They take
    # turns, in swapped order every other repeat, so that load changes and order effects hit both; the images and
    # the transformer rows are compared to show it is the same work.
    n, out = gargs.images_per_prompt, {}
    def brightness(images, prompts_):  # a cheap reward: mean pixel value
        out["cache"] += images
        return [float(np.asarray(im.convert("L")).mean()) / 255 for im in images]
    def bare():
        for i, p in enumerate(prompts):
            gens = [torch.Generator().manual_seed(gargs.seed + i * n + j) for j in range(n)]
            out["bare"] += pipe(prompt=p, num_images_per_prompt=n, generator=gens, height=gargs.resolution,
                                width=gargs.resolution, num_inference_steps=gargs.steps, guidance_scale=gargs.guidance).images
    def cache():
        with tempfile.TemporaryDirectory() as cache_dir:
            gdro.build_cache(pipe, "sd3", prompts, brightness, cache_dir, gargs)
            out["loaded"] = gdro.load_cache(cache_dir, prompts)
    pipe(prompt=prompts[0], num_inference_steps=1, height=gargs.resolution, width=gargs.resolution)  # warm-up, untimed
    counter, hook = count_rows(pipe.transformer)
    times, rows = {"bare": [], "cache": []}, {}
    for rep in range(repeats):
        for name, run in ((("bare", bare), ("cache", cache)) if rep % 2 == 0 else (("cache", cache), ("bare", bare))):
            out[name], counter["rows"], t0 = [], 0, stamp(device)
            run()
            times[name].append(since(t0, device))
            rows[name] = counter["rows"]
    hook.remove()
    ratios = [c[0] / b[0] for b, c in zip(times["bare"], times["cache"])]
    wall = [c[1] / b[1] for b, c in zip(times["bare"], times["cache"])]
    diff = max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(out["bare"], out["cache"]))
    print(f"rollout: build_cache / bare pipeline = {statistics.median(ratios):.3f} (per repeat {[round(r, 3) for r in ratios]}, "
          f"wall {[round(r, 3) for r in wall]}); same images: max pixel difference {diff}; transformer rows "
          f"{rows['cache']} (bare {rows['bare']})")
    images = len(prompts) * n
    return statistics.median(ratios), out["loaded"], rows["cache"] / images, statistics.median(b[0] for b in times["bare"]) / images


def transformer_work(transformer, lora_layers, kwargs, device):
    """The transformer work of one step: reference forward (LoRA off), policy forward and backward. The reference
    flips each LoRA layer's disable flag directly: peft's disable_adapters()/enable_adapters() walk every module and
    reset requires_grad (about 10 ms each at SD3.5-Medium size); gdro.train pays that, so it counts as overhead."""
    with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
        with torch.no_grad():
            for layer in lora_layers:
                layer._disable_adapters = True
            transformer(**kwargs)
            for layer in lora_layers:
                layer._disable_adapters = False
        out = transformer(**kwargs)[0]
    out.float().square().mean().backward()


def timed_training(transformer, family, scheduler_config, cache, gargs, device):
    # Runs gdro.train unchanged and, right after each optimizer step, the bare transformer work on the batch that
    # step used (captured from its forward call), so full steps and bare work alternate one to one. A full step is
    # the time between two optimizer steps less the bare work: sampling, x_t, both velocities, loss, backward,
    # clipping, AdamW, logging. The first pair (adapter setup, warm-up) is left out.
    counter, hook = count_rows(transformer)
    full, bare, last, lora_layers = [], [], [None], []
    def after_step(optimizer, args, kwargs):
        lora_layers[:] = lora_layers or [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        if last[0] is not None:
            full.append(since(last[0], device))
        optimizer.zero_grad(set_to_none=True)  # gdro.train does this next anyway; the bare backward starts as its own
        counter["on"], t0 = False, stamp(device)
        transformer_work(transformer, lora_layers, counter["kwargs"], device)
        bare.append(since(t0, device))
        counter["on"], last[0] = True, stamp(device)
    step_hook = register_optimizer_step_post_hook(after_step)
    try:
        gdro.train(transformer, family, PIPELINE[family], scheduler_config, cache, gargs, device)
    finally:
        step_hook.remove()
        hook.remove()
    return list(zip(full, bare))[1:], counter["rows"] / gargs.max_steps  # pairs (step i+1, bare work just before it)


def train_args(out, steps, cache, ckpt, guidance):
    n = cache["rewards"].shape[1]
    return gdro.parse_args(["--prompts", "-", "--out", out, "--max-steps", str(steps), "--images-per-prompt", str(n),
        "--group-size", str(min(6, n)), "--lora-rank", "32", "--guidance", str(guidance), "--save-every", "100000",
        "--grad-checkpointing" if ckpt else "--no-grad-checkpointing"])


def measure_step(base, cache, scheduler_config, steps, device):
    with tempfile.TemporaryDirectory() as out:
        pairs, rows_per_step = timed_training(copy.deepcopy(base), "sd3", scheduler_config, cache,
                                              train_args(out, steps, cache, device == "cuda", 4.5), device)
    ratios, wall = [f[0] / b[0] for f, b in pairs], [f[1] / b[1] for f, b in pairs]
    print(f"step: full / transformer work = {statistics.median(ratios):.3f} (median of {len(ratios)} adjacent pairs, range "
          f"{min(ratios):.3f}-{max(ratios):.3f}, {statistics.median(b[0] for _, b in pairs):.2f} s of work each; "
          f"wall-time median {statistics.median(wall):.3f})")
    return statistics.median(ratios), rows_per_step


def peak_memory(run, device):
    # CUDA: max_memory_allocated. CPU has no peak counter, so torch.profiler records every allocation and free of
    # torch's CPU allocator during run(); the running sum of their sizes peaks at the most memory the step had live
    # beyond what existed before (weights and cache: the same with and without checkpointing). That covers
    # activations saved for backward, block recomputation, gradients, LoRA + AdamW state and temporaries.
    if device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_ckpt_memory(base, cache, scheduler_config, device):
    peaks = {}
    for ckpt in (False, True):  # one whole gdro.train step each, on a fresh copy
        with tempfile.TemporaryDirectory() as out:
            transformer, gargs = copy.deepcopy(base), train_args(out, 1, cache, ckpt, 4.5)
            peaks[ckpt] = peak_memory(lambda: gdro.train(transformer, "sd3", PIPELINE["sd3"], scheduler_config, cache, gargs, device), device)
    print(f"memory: peak of a training step beyond weights and cache: {peaks[False] / 2**20:.1f} MiB without checkpointing, "
          f"{peaks[True] / 2**20:.1f} MiB with; ratio {peaks[True] / peaks[False]:.3f}")
    return peaks[True] / peaks[False]


def step_flops(model, family, shapes, k=6):
    # FLOPs counted by torch's FlopCounterMode on a copy built on the meta device (nothing allocated, nothing run):
    # reference forward (LoRA off), policy forward, policy backward (frozen base: input gradients + LoRA gradients).
    with torch.device("meta"):
        transformer = type(model).from_config(model.config)
        x, t = torch.randn(k, *shapes["x"]), torch.rand(k)
        cond = {name: torch.randn(k, *shapes[name]) for name in ("prompt_embeds", "pooled_prompt_embeds")}
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=gdro.LORA_TARGETS))
    flops = {}
    for name, switch in (("ref", transformer.disable_adapters), ("fwd", transformer.enable_adapters)):
        switch()
        with FlopCounterMode(display=False) as counter:
            out = gdro.velocity(transformer, family, x, t, cond, 3.5)
        flops[name] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out.float().square().mean().backward()
    return {**flops, "bwd": counter.get_total_flops()}


def measure_amortization(cache_rows_per_image, train_rows_per_step, k, flops, cached_images, steps):
    # Forward-equivalents per training image. Forward rows are counted on the transformer (CFG counts 2 rows); the
    # backward is priced by its counted FLOPs over a forward's. GDRO: the cache, spread over the images trained in
    # this run, plus the step. Online: regenerates its k images every step at the same sampler settings, same step.
    train = train_rows_per_step / k * (1 + flops["bwd"] / flops["fwd"] / 2)  # half the rows are the policy's
    epochs = steps * k / cached_images
    gdro_cost, online_cost = cache_rows_per_image / epochs + train, cache_rows_per_image + train
    print(f"amortization: per training image GDRO {gdro_cost:.2f} forward-equivalents (cache {cache_rows_per_image:.0f} "
          f"per image / {epochs:.2f} epochs + step {train:.2f}), online {online_cost:.2f}; ratio {online_cost / gdro_cost:.2f}")
    return online_cost / gdro_cost


def measure_ocr(n_images, gen_s_per_image, device):
    # build_cache scores each prompt's images after generating them, so OCR time adds to the rollout. Timed alone
    # here (the cheap reward stands in above), on 512-px renderings of text: what the reader sees in a real rollout.
    try:
        from reward_ocr import OcrReward, render_text
    except ImportError as e:
        print(f"ocr: skipped ({e})")
        return None
    reward, texts = OcrReward(device=device), ["Open Late", "Coffee First", "GDRO", "Hello World"][:n_images]
    images, t0 = [render_text(text) for text in texts], stamp(device)
    scores = reward(images, [f'a sign that says "{text}"' for text in texts])
    s = since(t0, device)[0] / len(images)
    print(f"ocr: {s:.2f} s per 512-px image on {device} (scores {scores}); the bench model generates an image in "
          f"{gen_s_per_image:.2f} s. build_cache scores prompt i in a worker while prompt i+1 generates, hiding it")
    return s


def real_architectures(device, with_flops, cuda_steps):
    """Parameter counts and bf16 weight memory (meta device: computed, not allocated); on CUDA the measured steps."""
    found = {}
    for name, (family, cls, config, shapes) in REAL.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls)(**config)
        params = sum(p.numel() for p in model.parameters())
        row = found[name] = {"params": params, "bf16_weight_gib": round(params * 2 / 2**30, 2)}
        if with_flops or device == "cuda":
            flops = step_flops(model, family, shapes)
            row.update(step_tflop=round(sum(flops.values()) / 1e12, 1), forward_tflop_per_image=round(flops["ref"] / 6e12, 2))
        print(f"{name}: {params / 1e9:.3f} B parameters, {row['bf16_weight_gib']} GiB of bf16 weights (computed)"
              + (f"; one k=6 512-px step = {row['step_tflop']} TFLOP" if "step_tflop" in row else ""))
        for ckpt in ((True, False) if device == "cuda" else ()):
            row["ckpt" if ckpt else "no_ckpt"] = cuda_step(family, cls, config, shapes, ckpt, sum(flops.values()), cuda_steps)
    return found


def cuda_step(family, cls, config, shapes, ckpt, flops, steps):
    # Real size on the GPU: bf16 random weights from the config, a random k=6 cache, gdro.train as in a real run.
    # TFLOP/s counts the step's model FLOPs (no recomputation) over its time; peak memory includes the weights.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            transformer = getattr(diffusers, cls)(**config)
    finally:
        torch.set_default_dtype(torch.float32)
    cache = {"x0": torch.randn(1, 6, *shapes["x"]), "rewards": torch.rand(1, 6),
             **{k: torch.randn(1, *shapes[k], dtype=torch.bfloat16) for k in ("prompt_embeds", "pooled_prompt_embeds")}}
    scheduler_config = dict(gdro.build_tiny_pipeline(family).scheduler.config)  # the real models' shift settings
    torch.cuda.reset_peak_memory_stats()
    try:
        with tempfile.TemporaryDirectory() as out:
            pairs, _ = timed_training(transformer, family, scheduler_config, cache,
                                      train_args(out, steps, cache, ckpt, gdro.DEFAULT_GUIDANCE[family]), "cuda")
        step_s = statistics.median(f[0] for f, _ in pairs)
        result = {"step_s": round(step_s, 3), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  "tflops": round(flops / step_s / 1e12, 1), "step_overhead": round(statistics.median(f[0] / b[0] for f, b in pairs), 3)}
    except torch.OutOfMemoryError:
        result = {"oom": True}
    del transformer
    gc.collect()
    torch.cuda.empty_cache()
    print(f"  {cls} bf16, checkpointing {'on' if ckpt else 'off'}: {result}")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure what GDRO costs, as ratios in one run; the last line is JSON.")
    p.add_argument("--quick", action="store_true", help="small version for CI smoke (under a minute)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time then measures our work only)")
    p.add_argument("--cuda-steps", type=int, default=6, help="training steps per real-size CUDA measurement")
    args = p.parse_args(argv)
    s = argparse.Namespace(**(QUICK if args.quick else FULL))
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = bench_pipeline(s.width, s.layers, s.resolution, device)
    base, scheduler_config = pipe.transformer, dict(pipe.scheduler.config)
    print(f"bench model: SD3Transformer2DModel width {s.width}, {s.layers} layers, "
          f"{sum(q.numel() for q in base.parameters()) / 1e6:.1f} M parameters, {s.resolution} px, k = 6, on {device}")
    prompts = [f'a shop sign that reads "Offer {i}"' for i in range(s.prompts)]
    gargs = gdro.parse_args(["--prompts", "-", "--images-per-prompt", str(s.images), "--rollout-batch", str(s.images),
        "--steps", str(s.sampler_steps), "--resolution", str(s.resolution), "--guidance", str(gdro.DEFAULT_GUIDANCE["sd3"])])

    rollout_overhead, cache, cache_rows_per_image, gen_s_per_image = measure_rollout(pipe, prompts, gargs, s.repeats, device)
    step_overhead, train_rows_per_step = measure_step(base, cache, scheduler_config, s.train_steps, device)
    ckpt_memory_ratio = measure_ckpt_memory(base, cache, scheduler_config, device)
    shapes = {"x": cache["x0"].shape[2:], **{k: cache[k].shape[1:] for k in ("prompt_embeds", "pooled_prompt_embeds")}}
    offline_amortization = measure_amortization(cache_rows_per_image, train_rows_per_step, 6, step_flops(base, "sd3", shapes),
                                                cache["rewards"].numel(), s.train_steps)
    ocr = measure_ocr(s.ocr_images, gen_s_per_image, device) if s.ocr_images else None
    real = real_architectures(device, not args.quick, args.cuda_steps)

    figures = {"step_overhead": step_overhead, "rollout_overhead": rollout_overhead, "ckpt_memory_ratio": ckpt_memory_ratio,
               "offline_amortization": offline_amortization}
    for name, target in (("step_overhead", 1.10), ("rollout_overhead", 1.10), ("ckpt_memory_ratio", 0.60)):
        print(f"{name:>20} {figures[name]:.3f}  (target <= {target:.2f}: {'met' if figures[name] <= target else 'MISSED'})")
    print(f"{'offline_amortization':>20} {offline_amortization:.3f}  (online / GDRO forward-equivalents per training image)")
    print(json.dumps({**{k: round(v, 4) for k, v in figures.items()}, "device": device, "quick": args.quick,
                      "ocr_s_per_image": ocr and round(ocr, 3), "real": real}))


if __name__ == "__main__":
    main()
