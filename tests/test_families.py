"""The six model families (families.py), each held to the same specification on its tiny random pipeline: the
velocity training uses is the one the pipeline's own sampler steps with; the cache's latents decode to the
pipeline's own image; at LoRA init the policy's and the reference's errors are equal; a whole --tiny run (rollouts
or --from-images) writes a LoRA that the family's pipeline loads and that changes it; --dry-run knows each family.

Run: pytest -q tests/test_families.py   (-m "not slow": everything but the end-to-end runs, seconds per family)
"""
import copy
import functools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import families
import gdro

gdro.load_more_families()  # all six: the paper's two and families.py's
FAMILIES = list(gdro.FAMILIES)
PROMPT = 'a shop sign that reads "Open"'
RES = 64  # the tiny pipelines' resolution
# the guidance at which each pipeline's step is a single conditional transformer call (no CFG); a distilled
# guidance the transformer embeds is passed to gdro.velocity too
ONE_PASS = {"sd3": dict(guidance_scale=1.0), "flux": dict(guidance_scale=3.5), "qwen-image": {},  # no negative: no CFG
            "flux2": dict(guidance_scale=4.0), "flux2-klein": {}, "z-image": dict(guidance_scale=0.0)}
HUB_IDS = {"stabilityai/stable-diffusion-3.5-large": "sd3", "black-forest-labs/FLUX.1-schnell": "flux",
           "Qwen/Qwen-Image": "qwen-image", "black-forest-labs/FLUX.2-dev": "flux2",
           "black-forest-labs/FLUX.2-klein-4B": "flux2-klein", "Tongyi-MAI/Z-Image-Turbo": "z-image"}


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    """(family, its tiny pipeline, the prompt's cached conditioning): built once per family for the module."""
    pipe, record = gdro.load_pipeline("", tiny=True, family=request.param)
    return request.param, pipe, gdro.encode_prompt(pipe, record, PROMPT)[0]


def embedded_guidance(pipe, family):
    g = ONE_PASS[family].get("guidance_scale")
    return g if getattr(pipe.transformer.config, "guidance_embeds", False) else None


def random_image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (RES, RES, 3), dtype=np.uint8))

# ----------------------------------------------------------------------------- the velocity, the cache's latents


def test_the_family_velocity_equals_the_velocity_inside_the_pipelines_own_denoising_step(tiny):
    family, pipe, cond = tiny
    seen, step = [], pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):  # what the pipeline's Euler step receives
        inputs = model_output.clone(), sample.clone()
        out = step(model_output, timestep, sample, *args, **kwargs)
        seen.append((inputs[0], pipe.scheduler.sigmas[pipe.scheduler.step_index - 1], inputs[1]))  # the step's t
        return out

    pipe.scheduler.step = recording_step
    try:  # the pipeline encodes the prompt itself: gdro.encode_prompt's conditioning is checked too
        pipe(prompt=PROMPT, height=RES, width=RES, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
             output_type="latent", **ONE_PASS[family])
    finally:
        del pipe.scheduler.step
    assert len(seen) == 2 and 0 < seen[1][1] < seen[0][1] == 1
    for v_pipe, sigma, x_t in seen:
        with torch.no_grad():
            guidance = embedded_guidance(pipe, family)
            v = gdro.family_record(family).velocity(pipe.transformer, x_t, sigma.expand(1), cond, guidance)
        assert v.abs().max() > 1e-3  # a velocity, not zeros
        torch.testing.assert_close(v, v_pipe, rtol=1e-4, atol=2e-5)


def test_cached_latents_of_a_rollout_decode_to_the_pipelines_own_image(tiny):
    family, pipe, cond = tiny
    _, uncond = gdro.encode_prompt(pipe, gdro.family_record(family), PROMPT)
    guidance = gdro.family_record(family).guidance
    latents = gdro.generate(pipe, gdro.family_record(family), cond, uncond, [7], 2, guidance, RES)
    image = pipe(**gdro.family_record(family).sampler_inputs(cond, uncond, guidance), height=RES, width=RES,
                 num_inference_steps=2, generator=[torch.Generator().manual_seed(7)], output_type="np").images[0]
    (decoded,) = gdro.decode(pipe, gdro.family_record(family), latents)
    diff = np.abs(np.asarray(decoded, dtype=np.int16) - np.round(image * 255).astype(np.int16))
    assert decoded.size == (RES, RES) and diff.max() <= 1  # uint8 rounding


def test_encoding_undoes_decodings_normalisation_and_layout_exactly(tiny):
    # decode_latents is the pipeline's own (above); encode_pixels must be its inverse around the VAE: fed the latent
    # the VAE decoder received, as if the encoder returned it, it gives back the cached latents
    family, pipe, _ = tiny
    f = gdro.family_record(family)
    x0 = families.encode_images(pipe, gdro.family_record(family), [random_image(0), random_image(1)], RES)
    seen, decode = {}, pipe.vae.decode
    pipe.vae.decode = lambda z, *args, **kwargs: seen.setdefault("z", z) is None or decode(z, *args, **kwargs)
    pixels = f.decode_latents(pipe, x0)
    del pipe.vae.decode
    pipe.vae.encode = lambda *args, **kwargs: SimpleNamespace(latent_dist=SimpleNamespace(mean=seen["z"]))
    try:
        back = f.encode_pixels(pipe, pixels)
    finally:
        del pipe.vae.encode
    assert back.shape == x0.shape and seen["z"].shape != x0.shape or family in ("sd3", "z-image")
    torch.testing.assert_close(back, x0, rtol=1e-5, atol=1e-5)
    assert not torch.equal(seen["z"].flatten(), x0.flatten())  # a normalisation was applied, and undone

# ----------------------------------------------------------------------------- the LoRA


def test_at_lora_init_the_policy_and_reference_errors_are_equal(tiny):
    family, pipe, cond = tiny
    transformer = copy.deepcopy(pipe.transformer)
    gdro.add_lora(transformer, gdro.family_record(family).lora_targets, gdro.parse_args(["--tiny", "--prompts", "p"]))
    adapted = [name for name, _ in transformer.named_modules() if name.endswith("lora_A")]
    assert adapted, "the LoRA reached no module"
    if family.startswith("flux2"):  # the single-stream blocks, most of FLUX.2, are adapted too
        assert any(name.startswith("single_transformer_blocks") for name in adapted), adapted
    g = torch.Generator().manual_seed(0)
    shape = families.encode_images(pipe, gdro.family_record(family), [random_image(2)], RES).shape[1:]
    x0, eps, t = torch.randn(2, 3, *shape, generator=g), torch.randn(2, *shape, generator=g), torch.rand(2, generator=g)
    cond2 = {k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}
    velocity = functools.partial(gdro.family_record(family).velocity, guidance=embedded_guidance(pipe, family))
    err_policy, err_ref = gdro.velocity_errors(velocity, transformer, x0, cond2, t, eps)
    assert err_policy.shape == (2, 3) and torch.equal(err_policy, err_ref)
    assert not torch.equal(err_policy, err_policy[:, :1].expand_as(err_policy))  # each image its own error

# ----------------------------------------------------------------------------- training's t


@pytest.mark.parametrize("family", FAMILIES)
def test_training_t_is_shifted_as_the_familys_own_scheduler_shifts_it(family):
    from diffusers import FlowMatchEulerDiscreteScheduler
    config = gdro.family_record(family).scheduler
    shape = (4096, 64) if gdro.family_record(family).packed else (16, 128, 128)  # 1024 px: 4096 image tokens
    mu = gdro.schedule_mu(gdro.family_record(family), config, shape, 28)
    scheduler = FlowMatchEulerDiscreteScheduler(**{**config, "shift_terminal": None})  # that stretch is inference's
    scheduler.set_timesteps(sigmas=[0.3, 0.7], mu=mu if config.get("use_dynamic_shifting") else None)
    u = torch.tensor([0.3, 0.7])
    torch.testing.assert_close(math.exp(mu) / (math.exp(mu) + 1 / u - 1), scheduler.sigmas[:2].float())


def test_flux2s_shift_follows_the_step_count_as_its_pipeline_sets_it():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    config = gdro.family_record("flux2").scheduler
    flux2 = gdro.family_record("flux2")
    mus = [gdro.schedule_mu(flux2, config, (1024, 128), steps) for steps in (4, 50)]  # 512 px: 1024 tokens
    assert mus == [compute_empirical_mu(1024, 4), compute_empirical_mu(1024, 50)] and mus[0] != mus[1]

# ----------------------------------------------------------------------------- the family of a model


@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_plans_each_family_with_its_pipeline_and_defaults(family, capsys):
    assert gdro.main(["--prompts", "ocr.txt", "--tiny", "--family", family, "--dry-run"]) is None
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    f = gdro.family_record(family)
    assert (plan["family"], plan["pipeline"], plan["guidance"]) == (family, f.pipeline, f.guidance)
    assert plan["steps"] == families.TINY_RUN["steps"]


@pytest.mark.parametrize("hub_id", list(HUB_IDS))
def test_a_hub_id_names_its_family_before_anything_loads(hub_id):
    args = gdro.settle_model(gdro.parse_args(["--prompts", "p", "--model", hub_id]))
    f = gdro.family_record(HUB_IDS[hub_id])
    assert (args.family, args.guidance, args.steps) == (f.name, f.guidance, f.steps)


def test_a_folders_pipeline_class_names_its_family_and_an_unsupported_one_is_refused_naming_the_supported(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    assert gdro.settle_model(gdro.parse_args(["--prompts", "p", "--model", str(tmp_path)])).family == "z-image"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(gdro.BadInput, match="StableDiffusionXLPipeline.*supported: StableDiffusion3Pipeline") as e:
        gdro.settle_model(gdro.parse_args(["--prompts", "p", "--model", str(tmp_path)]))
    assert e.value.code == 2 and all(f.pipeline in str(e.value) for f in gdro.FAMILIES.values())

# ----------------------------------------------------------------------------- end to end, each family

SMALL_RUN = ["--max-prompts", "2", "--images-per-prompt", "6", "--steps", "2", "--max-steps", "2",
             "--groups-per-step", "1", "--log-every", "1", "--save-every", "2"]
REWARD = ("import numpy as np\n"
          "def brightness(images, prompts):\n    return [float(np.asarray(im).mean()) for im in images]\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    (d / "prompts.txt").write_text('a shop sign that reads "Open Late"\na mug printed with "Coffee 42"\n')
    (d / "reward.py").write_text(REWARD)
    images = d / "images"
    images.mkdir()
    rows = [{"file_name": f"{i}.png", "prompt": "a red square", "reward": i / 6} for i in range(6)]
    for i, row in enumerate(rows):
        random_image(10 + i).save(images / row["file_name"])
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def lora_changes_a_fresh_pipeline(family, lora_dir):
    pipe, _ = gdro.load_pipeline("", tiny=True, family=family)
    cond, uncond = gdro.encode_prompt(pipe, gdro.family_record(family), PROMPT)
    record = gdro.family_record(family)
    sample = lambda: gdro.generate(pipe, record, cond, uncond, [123], 2, record.guidance, RES)
    before = sample()
    pipe.load_lora_weights(str(lora_dir))
    return (sample() - before).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_run_writes_a_lora_that_loads_into_the_familys_pipeline_and_changes_it(family, workdir):
    out = workdir / f"run_{family}"
    lora = gdro.main(["--prompts", str(workdir / "prompts.txt"), "--tiny", "--family", family, "--out", str(out),
                      "--reward", f"{workdir / 'reward.py'}:brightness", *SMALL_RUN])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(math.isfinite(line["loss"]) for line in lines)
    assert lora_changes_a_fresh_pipeline(family, lora) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_from_images_run_caches_the_images_in_the_familys_layout_and_its_lora_loads(family, workdir):
    out = workdir / f"images_{family}"
    lora = gdro.main(["--from-images", str(workdir / "images"), "--tiny", "--family", family, "--out", str(out),
                      "--max-steps", "2", "--groups-per-step", "1", "--save-every", "2", "--log-every", "1"])
    pipe, _ = gdro.load_pipeline("", tiny=True, family=family)
    images = [Image.open(workdir / "images" / f"{i}.png") for i in range(6)]
    encoded = families.encode_images(pipe, gdro.family_record(family), images, RES)
    torch.testing.assert_close(gdro.read_shard(out / "cache", 0)["x0"], encoded, rtol=1e-4, atol=1e-5)
    assert lora_changes_a_fresh_pipeline(family, lora) > 1e-4
