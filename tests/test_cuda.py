"""GPU acceptance tests: the tiny pipeline of every family end to end on CUDA, SD3.5-Medium and FLUX.1-dev at real
size (random bf16 weights built from their configs by bench.py's builders, no download) through gdro.build_cache
and gdro.train, and the other supported architectures (bench.COMPUTED: SD3.5-Large, Qwen-Image, FLUX.2 [dev],
FLUX.2 [klein] 4B and 9B, Z-Image) at real size through gdro.train on a cache of random latents of their shapes.
All fit 80 GB with checkpointing (FLUX.2 [dev] only just: about 75 GiB by bench.py's estimate).

    pytest -m cuda -q        # one 80 GB GPU, about 10 minutes; skipped without CUDA (conftest.py)

Only requirements.txt is needed, and not all of it: training uses the toy reward, and eval.py reads text with
EasyOCR where its weights are installed, else with a stand-in reward (the weights are a 91 MB package a GPU machine
may lack; OCR itself is tested on CPU). Every test prints what it measured (shown with -s) and puts the same figures
in its assert messages.
"""
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eval as gdro_eval
import families
import gdro
from experiments import bench

DEVICE = torch.device("cuda")
gdro.load_more_families()  # all six: the paper's two and families.py's
FAMILIES = list(gdro.FAMILIES)
GPU_GIB = 80  # the GPU the real-size tests are sized for
# each prompt: a colour for the reward, a text for OCR
PROMPTS = ['a red shop sign that reads "Open Late"', 'a green mug printed with "Coffee 42"',
           'a blue neon sign saying "Bar"', 'a red cake with "Happy Birthday Ana"']
TOY_REWARD = f"{Path(__file__).resolve().parent.parent / 'experiments' / 'toy_reward.py'}:colour_reward"


@pytest.fixture(autouse=True)
def free_gpu_memory():
    """Each test starts from what the one before it left behind: nothing."""
    yield
    bench.free_memory(DEVICE)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d

# ----------------------------------------------------------------------------- the tiny pipeline on CUDA


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_run(request, workdir):
    """`python gdro.py --tiny` on CUDA, one per family: (family, its folder, its LoRA)."""
    family, out = request.param, workdir / f"tiny_{request.param}"
    t0 = time.perf_counter()
    lora = gdro.main(["--prompts", str(workdir / "prompts.txt"), "--tiny", "--family", family, "--reward", TOY_REWARD,
                      "--out", str(out)])
    print(f"\n--tiny {family} on CUDA: {time.perf_counter() - t0:.1f} s end to end")
    return family, out, lora


@pytest.mark.cuda
def test_tiny_run_on_cuda_logs_finite_losses_and_its_lora_changes_a_fresh_pipeline(tiny_run):
    family, out, lora = tiny_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"{family}: losses {[round(l['loss'], 4) for l in lines]}, "
          f"grad norms {[round(l['grad_norm'], 4) for l in lines]}")
    assert lines and all(math.isfinite(l["loss"]) and math.isfinite(l["grad_norm"]) for l in lines), lines
    assert json.loads((out / "config.json").read_text())["grad_checkpointing"] is True  # the CUDA default
    pipe, _ = gdro.load_pipeline("", tiny=True, family=family, device=DEVICE)
    cond, uncond = gdro.encode_prompt(pipe, gdro.family_record(family), PROMPTS[0])
    sample = lambda: gdro.generate(pipe, gdro.family_record(family), cond, uncond, [123], 4,
                                   gdro.family_record(family).guidance, 64)
    before = sample()
    pipe.load_lora_weights(str(lora))
    change = (sample() - before).abs().max().item()
    print(f"{family}: the LoRA moves the latents of a fresh tiny pipeline by up to {change:.4f}")
    assert change > 1e-4, f"{family}: the LoRA changed the latents by only {change}"


@pytest.mark.cuda
def test_eval_tiny_on_cuda_scores_the_base_and_the_lora_images(tiny_run, workdir, monkeypatch):
    family, out, lora = tiny_run
    if importlib.util.find_spec("easyocr") is None or importlib.util.find_spec("easyocr_en_models") is None:
        print("\neval on CUDA: EasyOCR or its weights are not installed; the mean brightness stands in for OCR")
        monkeypatch.setattr(gdro_eval, "load_ocr", lambda: bench.brightness)
    t0 = time.perf_counter()
    report = gdro_eval.main(["--prompts", str(workdir / "prompts.txt"), "--tiny", "--family", family, "--lora",
                             str(lora), "--judge", "none", "--out", str(out / "eval")])
    print(f"eval --tiny {family} on CUDA: {time.perf_counter() - t0:.1f} s; OCR reward base "
          f"{report['base']['ocr_reward']:.3f}, LoRA {report['lora']['ocr_reward']:.3f}")
    for name in ("base", "lora"):
        entry = report[name]
        assert entry["n_images"] == len(PROMPTS) and 0 <= entry["ocr_reward"] <= 1, (name, entry)
        assert len(list((out / "eval" / "images" / name).glob("*.png"))) == len(PROMPTS)
    assert (out / "eval" / "grid.png").is_file()

# ----------------------------------------------------------------------------- the real architectures


@pytest.fixture(scope="module", params=list(bench.REAL))
def real_cache(request, workdir):
    """One prompt's rollout group at real size (16 images, 10 Euler steps, 512 px) through gdro.build_cache: the
    real-size transformer and VAE, text encoders tiny in depth with outputs of the real shapes.
    Returns (name, cache folder, seconds of the first call, peak GiB)."""
    name, run = request.param, bench.REAL_RUN
    real = bench.architecture(name)
    pipe = bench.build_pipeline(real, DEVICE, torch.bfloat16)
    args = bench.rollout_args(real["family"], run["images"], run["steps"], run["resolution"])
    bench.free_memory(DEVICE)
    t0 = time.perf_counter()
    gdro.build_cache(pipe, gdro.family_record(real["family"]), [bench.PROMPT], bench.brightness,
                     workdir / f"cache_{name}", args)
    torch.cuda.synchronize()
    seconds, peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30
    del pipe
    bench.free_memory(DEVICE)
    print(f"\n{name}: one prompt's rollout group in {seconds:.2f} s (first call, warm-up included), "
          f"peak {peak:.1f} GiB")
    return name, workdir / f"cache_{name}", seconds, peak


@pytest.mark.cuda
def test_real_size_rollout_group_writes_a_whole_shard_of_the_real_shapes(real_cache):
    name, cache_dir, seconds, peak = real_cache
    shapes, n = bench.REAL[name]["shapes"], bench.REAL_RUN["images"]
    shard = gdro.read_shard(cache_dir, 0)
    found = {key: tuple(value.shape) for key, value in shard.items()}
    print(f"{name}: shard {found}; rollout {seconds:.2f} s, peak {peak:.1f} GiB")
    assert found["x0"] == (n, *shapes["x0"]), found
    assert all(found[key] == shapes[key] for key in ("prompt_embeds", "pooled_prompt_embeds")), found
    assert shard["x0"].float().isfinite().all() and shard["rewards"].isfinite().all(), f"{name}: non-finite rollout"
    assert shard["seeds"].tolist() == [gdro.image_seed(0, 0, j, n) for j in range(n)]


@pytest.mark.cuda
def test_real_size_training_steps_are_finite_change_the_lora_and_fit_in_memory(real_cache, workdir):
    name, cache_dir, _, _ = real_cache
    real = bench.architecture(name)
    family, steps = real["family"], 3
    sizes, _ = gdro.check_cache(cache_dir, [bench.PROMPT])
    transformer = bench.build_transformer(real, DEVICE, torch.bfloat16)
    out = workdir / f"train_{name}"
    args = bench.train_args(out, family, steps, groups=2, micro_batch=1, ckpt=True, log_every=1)  # k = 6, 2 groups
    bench.free_memory(DEVICE)
    t0 = time.perf_counter()
    lora_dir = bench.train(transformer, family, cache_dir, sizes, args, DEVICE)
    seconds, peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30
    del transformer
    bench.free_memory(DEVICE)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses, norms = [l["loss"] for l in lines], [l["grad_norm"] for l in lines]
    lora = load_file(lora_dir / gdro.LORA_FILE)
    moved = max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k)  # B starts at zero
    print(f"{name}: {steps} steps of 2 groups of {bench.K} in {seconds:.1f} s, peak {peak:.1f} GiB (limit "
          f"{bench.PEAK_GIB[name]}); losses {losses}, LoRA gradient norms {norms}; LoRA B moved up to {moved:.2e}")
    assert [l["step"] for l in lines] == [1, 2, 3], lines
    assert all(math.isfinite(x) for x in losses + norms), f"{name}: losses {losses}, gradient norms {norms}"
    assert all(v.isfinite().all() for v in lora.values()), f"{name}: non-finite LoRA weights"
    assert moved > 0, f"{name}: the LoRA did not change"
    assert peak <= bench.PEAK_GIB[name], f"{name}: peak {peak:.1f} GiB > {bench.PEAK_GIB[name]} GiB"


@pytest.fixture(scope="module", params=list(bench.COMPUTED))
def computed_cache(request, workdir):
    """One prompt's cache of 16 random latents and conditioning of an architecture's real shapes at 512 px (random
    weights draw nothing worth scoring: training is what is tested). Returns (name, cache folder)."""
    name = request.param
    return name, bench.random_cache(bench.COMPUTED[name], workdir / f"cache_{name}")


def two_steps(transformer, family, cache_dir, sizes, out):
    """2 training steps of one k = 6 group with checkpointing through gdro.train, the transformer released after:
    (metrics.jsonl's lines, the LoRA's tensors, how far its B moved from zero, seconds, peak GiB)."""
    args = bench.train_args(out, family, 2, groups=1, micro_batch=1, ckpt=True, log_every=1)
    bench.free_memory(DEVICE)  # and its peak statistics
    t0 = time.perf_counter()
    lora_dir = bench.train(transformer, family, cache_dir, sizes, args, DEVICE)
    seconds, peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30
    del transformer
    bench.free_memory(DEVICE)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lora = load_file(lora_dir / gdro.LORA_FILE)
    return lines, lora, max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k), seconds, peak


@pytest.mark.cuda
def test_every_other_family_at_real_size_trains_finite_steps_that_change_the_lora_within_80_gb(computed_cache, workdir):
    name, cache_dir = computed_cache
    spec = bench.COMPUTED[name]
    sizes, _ = gdro.check_cache(cache_dir, [bench.PROMPT])
    transformer = bench.build_transformer(spec, DEVICE, torch.bfloat16)
    lines, lora, moved, seconds, peak = two_steps(transformer, spec["family"], cache_dir, sizes,
                                                  workdir / f"train_{name}")
    print(f"\n{name}: 2 steps of one group of {bench.K} in {seconds:.1f} s, peak {peak:.1f} GiB; losses "
          f"{[l['loss'] for l in lines]}; LoRA B moved up to {moved:.2e}")
    assert [l["step"] for l in lines] == [1, 2] and all(math.isfinite(l["loss"]) for l in lines), lines
    assert all(v.isfinite().all() for v in lora.values()) and moved > 0, f"{name}: LoRA {moved}"
    assert peak <= GPU_GIB, f"{name}: peak {peak:.1f} GiB > {GPU_GIB} GiB"


CARD_24_GIB = 24 * (1 - bench.CARD_MARGIN)  # a 24 GB card as bench.smallest_card counts it


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_flux1_dev_at_real_size_on_a_quantized_base_trains_from_policy_equal_reference_within_a_24_gb_card(
        real_cache, workdir, kind):
    """--quantize's QLoRA recipe where it matters: FLUX.1-dev (28.4 GiB estimated in bf16) on a 24 GB card."""
    name, cache_dir, _, _ = real_cache
    if name != "flux.1-dev":
        pytest.skip("the 24 GB case is FLUX.1-dev's")
    pytest.importorskip(gdro.QUANTIZE[kind])  # bitsandbytes is optional (README), torchao in requirements.txt
    real = bench.architecture(name)
    sizes, _ = gdro.check_cache(cache_dir, [bench.PROMPT])
    transformer = families.quantize(bench.build_transformer(real, DEVICE, torch.bfloat16), kind, None, DEVICE)
    lines, _, moved, seconds, peak = two_steps(transformer, real["family"], cache_dir, sizes,
                                               workdir / f"train_{name}_{kind}")
    print(f"\n{name} on a {kind} base: 2 steps of one group of {bench.K} in {seconds:.1f} s, peak {peak:.1f} GiB "
          f"(bound {CARD_24_GIB:.1f}); losses {[l['loss'] for l in lines]}; err policy/ref at step 1 "
          f"{lines[0]['err_policy']:.6f}/{lines[0]['err_ref']:.6f}; LoRA B moved up to {moved:.2e}")
    assert all(math.isfinite(l["loss"]) for l in lines) and moved > 0, lines
    assert lines[0]["err_policy"] == pytest.approx(lines[0]["err_ref"], rel=1e-2), lines[0]  # B = 0 at step 1's draw
    assert peak <= CARD_24_GIB, f"{name} on {kind}: peak {peak:.1f} GiB > {CARD_24_GIB:.1f} GiB"
