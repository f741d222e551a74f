"""What GDRO costs, measured through gdro.py's own functions (build_cache, train, train_step, velocity_errors,
generate), never a copy: ratios on any machine; on a CUDA GPU also the real models' speed and memory.

    python -m experiments.bench                  # CUDA: SD3.5-Medium and FLUX.1-dev at real size (--real: one)
    python -m experiments.bench --quick          # CPU smoke (CI), under a minute: small configs, no estimates
    python -m experiments.bench --samplers       # each rollout sampler's distance to a 200-step solution (tiny models)
    python -m experiments.bench --architectures  # every supported architecture on the meta device (no weights)

A line per measurement, the tables of docs/cost.md and docs/models.md, then one JSON object with every figure
(docs/cost.md says what each is). Without CUDA the real architectures run on small configs: the code runs, no more.
"""
import functools
import gc
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

DEFAULTS = gdro.settle_model(gdro.parse_args([]))  # gdro.py's recipe: 16 images, 10 steps, 512 px, k = 6, rank 32
K = DEFAULTS.group_size
# the sampler study: each sampler's steps against a REFERENCE_STEPS-step Euler solution
SAMPLER_STEPS = (2, 4, 6, 8, 10, 16)
REFERENCE_STEPS = 200
SAMPLER_PROMPTS = ("a red apple on a wooden table", 'a shop sign that reads "Open Late"', "a blue bird in the snow")
SAMPLER_SEEDS = (0, 1)
# the real architectures' run (a rollout group, k, training steps, the matmul that measures the peak, the reference
# that sets each sampler's steps), and its small CPU version
REAL_RUN = dict(images=DEFAULTS.images_per_prompt, steps=DEFAULTS.steps, resolution=gdro.PAPER_RESOLUTION, k=K,
                train_steps=6, matmul=8192, reference_steps=REFERENCE_STEPS, reference_prompts=len(SAMPLER_PROMPTS))
SMALL_RUN = dict(images=4, steps=2, resolution=64, k=2, train_steps=3, matmul=512, reference_steps=50,
                 reference_prompts=1)
# the training settings measured: (checkpointing, groups per micro-batch, --compile); the first is gdro.py's default,
# the compiled one is compared with the same setting eager
TRAINING_SETTINGS = ((True, 1, False), (False, 1, False), (True, 2, False), (True, 4, False), (True, 2, True))
# what the offline design costs (docs/cost.md), with the most each may be (None: a figure)
RATIO_TARGETS = dict(step_overhead=1.10, rollout_overhead=1.10, ckpt_memory_ratio=0.60, offline_amortization=None)
# the GPU targets: training fits PEAK_GIB (as pytest -m cuda holds it); FLUX.1-dev trains at matmul_fraction of the
# matmul peak within it, and its fastest rollout is rollout_speedup times Euler's at the same ODE accuracy
PEAK_GIB = {"sd3.5-medium": 16, "flux.1-dev": 40}
TARGETS = {"flux.1-dev": dict(matmul_fraction=0.45, rollout_speedup=1.5)}
# bytes a frozen parameter takes per --quantize: bf16; torchao's int8 (its scale per row of thousands left out);
# bitsandbytes' NF4, 4 bits and an fp32 absmax per 64 weights
WEIGHT_BYTES = {"none": 2, "int8": 1, "nf4": 0.5 + 4 / 64}
# the cards an estimate is fitted to, in GB as sold (about as many GiB); usable: 10 % less (the CUDA context, the
# allocator's fragmentation, the estimate's own error of up to 10 %)
CARD_GB = (24, 48, 80)
CARD_MARGIN = 0.10
# REAL: SD3.5-Medium and FLUX.1-dev, measured end to end; COMPUTED: the other supported architectures, on the meta
# device; SMALL: REAL's CPU versions (architectures.json: data copied from each model's config.json)
CONFIGS = json.loads((Path(__file__).parent / "architectures.json").read_text())
REAL, COMPUTED, SMALL = CONFIGS["real"], CONFIGS["computed"], CONFIGS["small"]
ARCHITECTURES = {**REAL, **COMPUTED}
for spec in ARCHITECTURES.values():  # shapes as a tensor's: tuples
    spec["shapes"] = {key: tuple(shape) for key, shape in spec["shapes"].items()}
TEXT_TOKENS = 64  # a masked prompt's real tokens in the meta count: an OCR prompt in its chat template
PROMPT = 'a shop sign that reads "Open Late"'  # the real architectures' rollout prompt

# ----------------------------------------------------------------------------- models


def architecture(name, small=False):
    """REAL[name], or its small CPU version: SMALL's settings laid over each part."""
    return {part: {**value, **SMALL[name].get(part, {})} if small and isinstance(value, dict) else value
            for part, value in REAL[name].items()}


def build(cls, *args, device, dtype, seed=0, **kwargs):
    """cls(*args, **kwargs), seeded random weights made on the device in dtype (a 12 B model never in fp32 first),
    in eval mode, its float buffers in dtype as from_pretrained(torch_dtype=...) leaves them."""
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(*args, **kwargs).eval()
    finally:
        torch.set_default_dtype(before)
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    return model


def build_transformer(spec, device, dtype, seed=0):
    cls = type(families.build_tiny_pipeline(gdro.family_record(spec["family"])).transformer)
    return build(cls, **spec["transformer"], device=device, dtype=dtype, seed=seed)


def build_pipeline(spec, device, dtype, seed=0):
    """The spec's family's pipeline, random weights: the tiny pipeline's text encoders widened to the spec's output
    sizes (rollouts need embeddings of the real shapes, not their meaning), its tokenizers and scheduler."""
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
    return gdro.parse_args(["--reward", f"{Path(__file__)}:brightness", "--images-per-prompt", str(images),
                            "--steps", str(steps), "--resolution", str(resolution), "--sampler", sampler,
                            "--guidance", str(gdro.family_record(family).guidance)])


def train_args(out, family, steps, groups=1, micro_batch=1, ckpt=True, log_every=10, k=K, compile=False):
    return gdro.parse_args(["--out", str(out), "--max-steps", str(steps), "--groups-per-step", str(groups),
                            "--micro-batch", str(micro_batch), "--group-size", str(k), "--log-every", str(log_every),
                            "--save-every", str(steps), "--guidance", str(gdro.family_record(family).guidance),
                            "--steps", str(DEFAULTS.steps),  # the rollouts' steps (FLUX.2's shift of t follows them)
                            "--grad-checkpointing" if ckpt else "--no-grad-checkpointing"] + ["--compile"] * compile)


def train(transformer, family, cache_dir, sizes, args, device):
    """gdro.train as gdro.main calls it."""
    import diffusers  # here, not at the top: a refused flag answers before diffusers' long import
    record = gdro.family_record(family)
    return gdro.train(transformer, gdro.Run(args, record, getattr(diffusers, record.pipeline), record.scheduler,
                                            cache_dir, sizes, device))


def random_cache(spec, folder, n=REAL_RUN["images"], seed=0):
    """One prompt's cache of random latents and conditioning of the spec's shapes (test_cuda.py trains COMPUTED's)."""
    g = torch.Generator().manual_seed(seed)
    shard = {"x0": torch.randn(n, *spec["shapes"]["x0"], generator=g), "rewards": torch.rand(n, generator=g)}
    shard.update({key: (torch.arange(shape[0]) < TEXT_TOKENS).long() if key == "prompt_mask" else
                  torch.randn(shape, generator=g) for key, shape in spec["shapes"].items() if key != "x0"})
    gdro.write_shard(folder, 0, PROMPT, shard)
    return folder


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

# ----------------------------------------------------------------------------- measuring


def stamp(device):
    """Seconds: on a CPU the process's (one thread, --threads), so other users stay out of it; on CUDA wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def peak_memory(run, device):
    """(run's result, the most bytes it had allocated at once beyond those at its start). A CPU has no peak counter:
    the running sum of the allocations and frees torch.profiler records peaks there."""
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
    """A step's transformer work alone: velocity_errors and the backward (autograd.grad: the LoRA's .grad untouched)."""
    lora = [p for p in transformer.parameters() if p.requires_grad]
    velocity = functools.partial(gdro.family_record(family).velocity, guidance=guidance)
    with gdro.training_context(transformer):  # the backward too: its attention backends are training's
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            err_policy, _ = gdro.velocity_errors(velocity, transformer, batch["x0"], batch["cond"], batch["t"],
                                                 batch["eps"])
        torch.autograd.grad(err_policy.sum(), lora)


def timed_training(transformer, family, cache_dir, sizes, args, device, bare_work=True):
    """gdro.train's loop timed step by step; with bare_work each step's last micro-batch's transformer work after it,
    so that the two alternate. ([(seconds of a step, of the bare work before it or None)], warm-up left out; loss)."""
    record = gdro.family_record(family)
    run = gdro.Run(args, record, None, record.scheduler, cache_dir, sizes, device)  # what gdro.train_step reads
    params = gdro.add_lora(transformer, record.lora_targets, args)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    guidance = args.guidance if getattr(transformer.config, "guidance_embeds", False) else None
    full, bare = [], []
    for step in range(args.max_steps):
        t0 = stamp(device)
        loss, groups, *_ = gdro.train_step(transformer, run, step).tolist()  # the host sync gdro.train makes
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        full.append(stamp(device) - t0)
        if bare_work:
            G, M = args.groups_per_step, args.micro_batch
            last = range(step * G + (G - 1) // M * M, (step + 1) * G)  # the step's last micro-batch
            batch = gdro.training_batch(run, last)
            t0 = stamp(device)
            transformer_work(transformer, family, batch, guidance, device)
            bare.append(stamp(device) - t0)
    return list(zip(full[1:], bare[:-1] if bare_work else [None] * (len(full) - 1))), loss / groups


def meta_step(spec, shapes, k=K, activations=False):
    """One group's step through gdro.velocity_errors with the default LoRA on the meta device (nothing run): the FLOPs
    of the forwards (policy, reference) and the backward (recomputation not counted), the LoRA's size; with
    activations the fp32 bytes kept for the backward with checkpointing, and without it per block."""
    from peft import LoraConfig  # here, not at the top: a refused flag answers before peft's long import
    record = gdro.family_record(spec["family"])
    transformer = build_transformer(spec, "meta", torch.float32).requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=DEFAULTS.lora_rank, lora_alpha=DEFAULTS.lora_rank,
                                       target_modules=record.lora_targets))
    guidance = record.guidance if getattr(transformer.config, "guidance_embeds", False) else None
    with torch.device("meta"):
        x0, eps, t = torch.randn(1, k, *shapes["x0"]), torch.randn(1, *shapes["x0"]), torch.rand(1)
        cond = {name: torch.randn(1, *shape) for name, shape in shapes.items() if name not in ("x0", "prompt_mask")}
    if "prompt_mask" in shapes:  # which tokens are real is data, which the meta device has none of: a host tensor
        cond["prompt_mask"] = (torch.arange(shapes["prompt_mask"][0]) < TEXT_TOKENS).long()[None]
    run = lambda: gdro.velocity_errors(functools.partial(record.velocity, guidance=guidance), transformer, x0, cond,
                                       t, eps)[0]
    with FlopCounterMode(display=False) as forward:
        err_policy = run()
    with FlopCounterMode(display=False) as backward:
        err_policy.sum().backward()
    found = {"forward": forward.get_total_flops(), "backward": backward.get_total_flops(),
             "lora_params": sum(p.numel() for p in transformer.parameters() if p.requires_grad)}
    blocks = sum(len(m) for m in transformer.children() if isinstance(m, torch.nn.ModuleList))
    for checkpointed in (False, True) if activations else ():
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
    """A k-image step's peak with checkpointing from meta_step's counts: frozen weights at WEIGHT_BYTES[quantize] (all
    of them; norms and biases stay bf16: a little under), the LoRA, its gradient and AdamW's moments (16 bytes each),
    the block inputs and one block's recomputation in bf16. Unquantized, within 10 % of the peaks an H200 measured."""
    activations = (found["saved_checkpointed"] + found["saved_per_block"]) / 2
    return (params * WEIGHT_BYTES[quantize] + found["lora_params"] * 16 + activations) / 2**30


def smallest_card(gib):
    """The smallest card of CARD_GB whose usable memory (CARD_MARGIN less) holds gib, or None if none does."""
    return next((gb for gb in CARD_GB if gib <= gb * (1 - CARD_MARGIN)), None)


def cached_shapes(cache_dir):
    shard = gdro.read_shard(cache_dir, 0)  # one image's and its conditioning's, as training reads them
    return {"x0": tuple(shard["x0"].shape[1:]),
            **{name: tuple(value.shape) for name, value in shard.items() if name not in ("x0", "rewards", "seeds")}}


def matmul_tflops(device, n, repeats=20):
    """The device's dense matmul throughput, measured on n^3 products: bf16 on CUDA (training's dtype), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    t0 = stamp(device)
    for _ in range(repeats):
        a @ b
    tflops = 2 * n ** 3 * repeats / (stamp(device) - t0) / 1e12
    print(f"matmul peak: {tflops:.3g} TFLOP/s ({n}^3, {str(dtype).removeprefix('torch.')}, {device.type})")
    return tflops


def train_cost(flops):
    """Forward-equivalents of training one image: the policy's and reference's forwards, the backward by its FLOPs."""
    return 2 + 2 * flops["backward"] / flops["forward"]


def offline_amortization(rollout_per_image, train_per_image, epochs):
    """Forward-equivalents per training image, online / GDRO: GDRO spreads its cache over the epochs it trains on it,
    an online method draws its images again at the same sampler settings for every step."""
    return (rollout_per_image + train_per_image) / (rollout_per_image / epochs + train_per_image)


def relative_rms(x, reference):
    """Mean over images of RMS(x - reference) / RMS(reference)."""
    rms = lambda v: v.flatten(1).pow(2).mean(1).sqrt()
    return (rms(x - reference) / rms(reference)).mean().item()


def markdown_table(header, rows, align):
    """header and rows: lists of cells (printed with str); align: a letter per column, "l" text or "r" figures."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(str(cell) for cell in cells) + " |" for cells in (header, rule, *rows))

# ----------------------------------------------------------------------------- samplers


@functools.cache
def distance_to_reference(family, prompts, seeds, reference_steps):
    """distance(sampler, steps): the relative RMS distance of its latents, on the family's tiny model, to Euler's
    reference_steps solution from the same noises; cached: the reference is solved once."""
    pipe, record = gdro.load_pipeline(None, tiny=True, family=family)  # its progress bar off, as gdro.py's
    config, guidance = dict(pipe.scheduler.config), record.guidance
    encoded = [gdro.encode_prompt(pipe, record, prompt) for prompt in prompts]

    def solve(sampler, n):
        pipe.scheduler = families.make_scheduler(sampler, config)
        return torch.cat([gdro.generate(pipe, record, cond, uncond, seeds, n, guidance, families.TINY_RUN["resolution"])
                          for cond, uncond in encoded])

    reference = solve("euler", reference_steps)
    return lambda sampler, n: relative_rms(solve(sampler, n), reference)


def sampler_distances(family, samplers=tuple(families.SAMPLERS), steps=SAMPLER_STEPS, reference_steps=REFERENCE_STEPS,
                      prompts=SAMPLER_PROMPTS, seeds=SAMPLER_SEEDS):
    """{sampler: {steps: distance}} on the tiny model of the family (distance_to_reference)."""
    distance, found = distance_to_reference(family, tuple(prompts), tuple(seeds), reference_steps), {}
    for sampler in samplers:
        found[sampler] = {n: distance(sampler, n) for n in steps}
        print(f"samplers {family} {sampler}: " + ", ".join(f"{n} steps {d:.4f}" for n, d in found[sampler].items()))
    return found


def equal_accuracy_steps(family, steps, reference_steps=REFERENCE_STEPS, prompts=len(SAMPLER_PROMPTS)):
    """{sampler: the fewest steps as close to the reference as Euler's `steps`} (tiny models; a trained one differs)."""
    distance = distance_to_reference(family, SAMPLER_PROMPTS[:prompts], SAMPLER_SEEDS, reference_steps)
    target = distance("euler", steps)
    return {sampler: steps if sampler == "euler" else next(
        (n for n in range(1, reference_steps) if distance(sampler, n) <= target), reference_steps)
        for sampler in families.SAMPLERS}


def samplers_report():
    found = {family: sampler_distances(family) for family in ("sd3", "flux")}
    for family, table in found.items():
        print(f"\ntiny {family} ({families.TINY_RUN['resolution']} px): relative RMS distance of the latents to a "
              f"{REFERENCE_STEPS}-step Euler solution, {len(SAMPLER_PROMPTS)} prompts x {len(SAMPLER_SEEDS)} seeds\n")
        rows = [[sampler, *(f"{row[n]:.4f}" for n in SAMPLER_STEPS)] for sampler, row in table.items()]
        print(markdown_table(["sampler \\ steps", *SAMPLER_STEPS], rows, "l" + "r" * len(SAMPLER_STEPS)) + "\n")
    return {f: {s: {str(n): round(d, 5) for n, d in row.items()} for s, row in t.items()} for f, t in found.items()}

# ----------------------------------------------------------------------------- the real architectures


def quantized(values, sep=" / "):
    """A table cell of one figure per --quantize ("7.1 / 5.0 / 4.1"); no card: ">" the largest; no values: empty."""
    cell = lambda x: f">{CARD_GB[-1]}" if x is None else str(x)
    return "" if values is None else sep.join(cell(values[q]) for q in WEIGHT_BYTES)


def quantize_labels(sep=" / "):
    """The --quantize names as the tables head their figures: "bf16 / int8 / nf4"."""
    return sep.join({"none": "bf16"}.get(q, q) for q in WEIGHT_BYTES)


def real_architectures(with_flops):
    """Each of ARCHITECTURES on the meta device: parameters; with_flops also the LoRA, a k = 6 512-px step's FLOPs,
    its estimated peak with checkpointing per --quantize and the smallest card that holds it (None: none does)."""
    found = {}
    for name, spec in ARCHITECTURES.items():
        params = sum(p.numel() for p in build_transformer(spec, "meta", torch.float32).parameters())
        row = found[name] = {"family": spec["family"], "hub_id": spec["hub_id"], "params": params,
                             "bf16_weight_gib": round(params * 2 / 2**30, 2)}
        if with_flops:
            step = meta_step(spec, spec["shapes"], activations=True)
            gib = {q: round(training_memory_gib(params, step, q), 1) for q in WEIGHT_BYTES}
            row.update(lora_params=step["lora_params"], lora_mib=round(step["lora_params"] * 4 / 2**20, 1),
                       step_tflop=round((step["forward"] + step["backward"]) / 1e12, 1),
                       est_train_gib_by_quantize=gib, est_train_gib=gib["none"],
                       fits_card_gb={q: smallest_card(g) for q, g in gib.items()})
        print(f"{name}: {params / 1e9:.3f} B parameters, {row['bf16_weight_gib']} GiB of bf16 weights (computed)"
              + (f"; LoRA r{DEFAULTS.lora_rank} {row['lora_mib']} MiB; one k={K} 512-px step = {row['step_tflop']} "
                 f"TFLOP, est. {quantized(row['est_train_gib_by_quantize'])} GiB with checkpointing "
                 f"({quantize_labels()})" if with_flops else ""))
    return found


def measure_rollouts(pipe, family, prompt, run, steps_for, work, device):
    """Seconds per prompt group through gdro.build_cache for each sampler at its steps_for, eager and (CUDA) compiled
    as --compile does, and of a bare pipeline call making Euler's images. (those, Euler's cache folder)"""
    found, n, side = {"steps": steps_for, "eager": None, "compiled": None}, run["images"], run["resolution"]
    record = gdro.family_record(family)
    for tag in ("eager", "compiled"):
        if tag == "compiled":
            if device.type != "cuda":
                print("  rollout compiled: skipped (torch.compile's GPU backend needs CUDA)")
                break
            families.compile_transformer(pipe.transformer)
        found[tag] = {}
        for sampler, steps in steps_for.items():
            for name, count in ((f"warmup_{tag}", 2), (tag, steps)):  # untimed first: kernels, autotuning, compiling
                args = rollout_args(family, n, count, side, sampler)
                t0 = stamp(device)
                gdro.build_cache(pipe, record, [prompt], brightness, work / f"{name}_{sampler}_{count}", args)
                found[tag][sampler] = round(stamp(device) - t0, 4)
            print(f"  rollout {tag} {sampler}, {steps} steps: {found[tag][sampler]:.3f} s ({n} images, {side} px)")
        if tag == "eager":  # Euler's images by a bare pipeline call, the same seeds: what build_cache adds to it
            t0 = stamp(device)
            pipe(prompt=prompt, num_images_per_prompt=n, height=side, width=side, guidance_scale=args.guidance,
                 generator=[torch.Generator().manual_seed(gdro.image_seed(0, 0, j, n)) for j in range(n)],
                 num_inference_steps=steps_for["euler"])
            found["bare_euler"] = round(stamp(device) - t0, 4)
    return found, work / f"eager_euler_{steps_for['euler']}"


def rollout_speedup(rollout_s, baseline_s=None):
    """The fastest rollout against eager Euler at gdro's default steps in this run, and against baseline_s if given."""
    s, tag, sampler = min((s, tag, sampler) for tag in ("eager", "compiled")
                          for sampler, s in (rollout_s[tag] or {}).items())
    return {"fastest": f"{sampler} {rollout_s['steps'][sampler]} steps {tag}", "s": s,
            "vs_euler": round(rollout_s["eager"]["euler"] / s, 3),
            "vs_baseline": baseline_s and round(baseline_s / s, 3)}


def measure_training(spec, cache_dir, run, flops, peak_tflops, work, device, dtype):
    """{setting: row} per TRAINING_SETTINGS, a fresh transformer each through gdro.train's loop: step time, peak memory
    (CUDA; weights included), the steps' own peak (a CPU profiles it, slower), model TFLOP/s and its share of the
    matmul peak, the loss (compiled: against eager's, the same draws); the first setting's step over its work."""
    found, sizes = {}, gdro.check_cache(cache_dir, [PROMPT])[0]
    for i, (ckpt, micro, compiled) in enumerate(TRAINING_SETTINGS):
        key = f"ckpt_{'on' if ckpt else 'off'}_m{micro}" + "_compiled" * compiled
        row = found[key] = {"checkpointing": ckpt, "micro_batch": micro, "compiled": compiled}
        if compiled and device.type != "cuda":
            row["skipped"] = "torch.compile's GPU backend needs CUDA"
            print(f"  training {key}: skipped ({row['skipped']})")
            continue
        args = train_args(work / key, spec["family"], run["train_steps"], groups=micro, micro_batch=micro, ckpt=ckpt,
                          k=run["k"], compile=compiled)
        transformer = None
        free_memory(device)
        try:  # built inside: the largest architectures' weights alone may not fit
            transformer = build_transformer(spec, device, dtype)
            (pairs, loss), step_peak = peak_memory(lambda: timed_training(
                transformer, spec["family"], cache_dir, sizes, args, device, bare_work=i == 0), device)
            step_s = median(full for full, _ in pairs)
            tflops = flops * micro / step_s / 1e12
            row.update(step_s=round(step_s, 4), tflops=round(tflops, 4), matmul_fraction=round(tflops / peak_tflops, 4),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                       step_peak_mib=round(step_peak / 2**20, 1), loss=round(loss, 6))
            if i == 0:
                row["step_overhead"] = round(median(full / bare for full, bare in pairs), 3)
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
    """One architecture end to end: rollouts per sampler (eager, compiled), training per setting, the ratios."""
    real, run, started = architecture(name, small), SMALL_RUN if small else REAL_RUN, time.perf_counter()
    steps_for = equal_accuracy_steps(real["family"], run["steps"], run["reference_steps"], run["reference_prompts"])
    print(f"{name}{' (small config)' if small else ''} on {device.type}: steps per sampler for the ODE accuracy of "
          f"{run['steps']} Euler steps (tiny {real['family']}): {steps_for}")
    pipe = build_pipeline(real, device, dtype)
    rollout_s, cache_dir = measure_rollouts(pipe, real["family"], PROMPT, run, steps_for, work / name, device)
    del pipe
    torch.compiler.reset()  # compiled graphs hold on to the rollout transformer
    free_memory(device)
    step = meta_step(real, cached_shapes(cache_dir), run["k"])
    flops = step["forward"] + step["backward"]  # one group's training step
    training = measure_training(real, cache_dir, run, flops, peak_tflops, work / name, device, dtype)
    step_s = training["ckpt_on_m1"].get("step_s")
    in_steps = step_s and round(rollout_s["eager"]["euler"] / step_s, 3)
    print(f"  one prompt's rollout ({run['images']} images, {run['steps']} Euler steps) = {in_steps} training steps "
          f"of one k={run['k']} group (checkpointing on); measured in {time.perf_counter() - started:.1f} s")
    baseline = None if small else gdro.MEASURED.get(real["hub_id"], {}).get("rollout_16x10")  # an earlier H200's
    return {"small_config": small, "wall_s": round(time.perf_counter() - started, 1), "rollout_s": rollout_s,
            "rollout_speedup": rollout_speedup(rollout_s, baseline), "step_tflop": round(flops / 1e12, 6),
            "training": training, "rollout_in_training_steps": in_steps, **ratios(real, run, rollout_s, training, step)}


def ratios(spec, run, rollout_s, training, step):
    """What the offline design costs, from one architecture's measurements (RATIO_TARGETS; docs/cost.md)."""
    on, off = training["ckpt_on_m1"], training["ckpt_off_m1"]
    rows = run["steps"] * (1 if spec["transformer"].get("guidance_embeds") else 2)  # per image; CFG: 2 rows a step
    epochs = run["train_steps"] * run["k"] / run["images"]  # one group of k a step, from one prompt's images
    peaks = on.get("step_peak_mib"), off.get("step_peak_mib")  # none where a setting failed
    return {"step_overhead": on.get("step_overhead"), "rollout_overhead": rollout_s["eager"]["euler"] /
            rollout_s["bare_euler"], "ckpt_memory_ratio": peaks[0] / peaks[1] if all(peaks) else None,
            "offline_amortization": offline_amortization(rows, train_cost(step), epochs)}


def print_tables(result):
    """Markdown: every architecture computed on the meta device; where measured, each training setting and rollout."""
    tables = [markdown_table(
        ["model", "family", "params", "bf16 GiB", f"LoRA r{DEFAULTS.lora_rank} MiB", f"k={K} step TFLOP (512 px)",
         f"est. train GiB {quantize_labels('/')}", "fits GB"],  # fits: the smallest card, in the same order
        [[name, row["family"], f"{row['params'] / 1e9:.2f} B", row["bf16_weight_gib"], row.get("lora_mib", ""),
          row.get("step_tflop", ""), quantized(row.get("est_train_gib_by_quantize")),
          quantized(row.get("fits_card_gb"), "/")] for name, row in result["real"].items()], "llrrrrrr")]
    measured = result.get("measured", {})
    if measured:
        failed = lambda row: "OOM" if row.get("oom") else row.get("error") or row.get("skipped")
        rows = [[name, "on" if row["checkpointing"] else "off", row["micro_batch"], "yes" if row["compiled"] else "no",
                 *([failed(row), "", "", ""] if failed(row) else
                   [row[key] for key in ("step_s", "peak_gib", "tflops", "matmul_fraction")])]
                for name, m in measured.items() for row in m["training"].values()]
        tables.append(markdown_table(["model", "checkpointing", "groups per micro-batch", "compiled", "step s",
                                      "peak GiB", "model TFLOP/s", "of matmul peak"], rows, "llrlrrrr"))
        rows = [[name, sampler, m["rollout_s"]["steps"][sampler], f"{s:.3f}",
                 "-" if m["rollout_s"]["compiled"] is None else f"{m['rollout_s']['compiled'][sampler]:.3f}"]
                for name, m in measured.items() for sampler, s in m["rollout_s"]["eager"].items()]
        tables.append(markdown_table(["model", "sampler", "steps (same ODE accuracy)", "s per prompt group",
                                      "compiled"], rows, "llrrr"))
    print("\n" + "\n\n".join(tables) + "\n")


def report_targets(measured, small):
    """Each architecture's fastest training setting within PEAK_GIB and fastest rollout, against TARGETS."""
    if small:
        return print("GPU targets: not measured (small configs; they need real sizes on a CUDA GPU)")
    verdict = lambda x, target: f" (target >= {target}: {'met' if x >= target else 'MISSED'})" if target else ""
    for name, m in measured.items():
        targets, (key, row) = TARGETS.get(name, {}), best_within_memory(m["training"], PEAK_GIB[name])
        fraction = row["matmul_fraction"] if row else 0
        print(f"{name} training: " + (f"the fastest setting within {PEAK_GIB[name]} GiB is {key}, at {fraction:.3f} of "
                                      f"the matmul peak" if row else f"no setting fits in {PEAK_GIB[name]} GiB")
              + verdict(fraction, targets.get("matmul_fraction")))
        speedup = m["rollout_speedup"]
        print(f"{name} rollout: fastest {speedup['fastest']}, {speedup['s']:.3f} s per prompt group: "
              f"{speedup['vs_euler']}x Euler's {REAL_RUN['steps']} steps in this run, {speedup['vs_baseline']}x the "
              "earlier H200 figure" + verdict(speedup["vs_euler"], targets.get("rollout_speedup")))

# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = experiments.Parser(description="Measure what GDRO costs; the last line printed is one JSON object.")
    p.add_argument("--quick", action="store_true", help="CPU smoke (CI), about a minute: small configs everywhere")
    p.add_argument("--samplers", action="store_true", help="only the samplers' distance to a 200-step solution")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU time then measures our work only)")
    p.add_argument("--real", choices=list(REAL), action="append", help="only this real architecture (repeatable)")
    p.add_argument("--architectures", action="store_true", help="only every architecture's table, on the meta device")
    args = p.parse_args(argv)
    experiments.check(("--threads", args.threads, experiments.AT_LEAST_1))
    only = [flag for flag in ("--samplers", "--architectures") if getattr(args, flag[2:])]
    for flag, given in (("--quick", args.quick), ("--real", args.real), *[(f, True) for f in only[1:]]):
        if only and given:  # each of --samplers and --architectures is a study of its own: nothing else applies
            raise gdro.BadInput(f"{only[0]} measures only that; drop {flag}")
    torch.set_num_threads(args.threads)
    if args.samplers:
        return print(json.dumps(samplers_report()))
    if args.architectures:
        real = real_architectures(with_flops=True)
        print_tables({"real": real})
        return print(json.dumps(real))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as gdro.main
    small = args.quick or device.type != "cuda"
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "quick": args.quick, "real": real_architectures(with_flops=not args.quick)}
    peak = result["matmul_peak_tflops"] = round(matmul_tflops(device, (SMALL_RUN if small else REAL_RUN)["matmul"]), 4)
    with tempfile.TemporaryDirectory() as tmp:
        result["measured"] = {name: measure_real(name, small, peak, Path(tmp), device, dtype)
                              for name in args.real or REAL}
    name, first = next(iter(result["measured"].items()))  # its ratios are the run's figures
    result.update({key: first[key] and round(first[key], 4) for key in RATIO_TARGETS})
    print_tables(result)
    report_targets(result["measured"], small)
    for key, most in RATIO_TARGETS.items():  # a small config's figures show that the code runs, not what it costs
        verdict = f"target <= {most}: {'met' if result[key] <= most else 'MISSED'}" if most and result[key] else ""
        print(f"{key:>20} {result[key]} ({name}: {'small config, no verdict' if small else verdict})")
    print(json.dumps(result))


if __name__ == "__main__":
    gdro.cli(main)
