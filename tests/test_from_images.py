"""--from-images DIR: your own images and scores instead of rollouts. DIR/metadata.jsonl follows Hugging Face's
"imagefolder" convention (one JSON object per image: file_name, prompt, reward; other keys ignored); each image is
encoded with the model's own VAE into an ordinary cache shard, and training runs unchanged.

Run: pytest -q tests/test_from_images.py   (-m "not slow": the input checks and the encoding, seconds)
"""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import families
import gdro

FAMILIES = ["sd3", "flux"]
RES = 64  # the tiny pipelines' resolution


def random_image(seed, size=(RES, RES)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_metadata(folder, rows):
    """rows: dicts (written as JSON) or raw strings (written as they are), one line each."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / "metadata.jsonl").write_text("".join(l + "\n" for l in lines))


def vae_reference(pipe, image):
    """What the cache must hold for an image already at the resolution, computed here from the VAE itself: the
    posterior mean of pixels in [-1, 1], shifted and scaled by the model's own factors, in [1, C, H, W]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mean
    return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

# ----------------------------------------------------------------------------- the encoding, both families


@pytest.mark.parametrize("family", FAMILIES)
def test_encoded_latent_is_the_vaes_mean_with_the_models_shift_and_scaling(family):
    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    images = [random_image(0), random_image(1)]
    x0 = families.encode_images(pipe, fam, images, RES)
    expected = torch.cat([vae_reference(pipe, im) for im in images])
    got = gdro.unpack_latents(x0) if fam.name == "flux" else x0  # FLUX's cache holds the transformer's packed layout
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    again = families.encode_images(pipe, fam, images, RES)
    torch.testing.assert_close(again, x0, rtol=0, atol=0)  # the mean: no noise


def test_flux_packing_puts_each_2x2_patch_in_one_token_and_unpacking_inverts_it():
    z = torch.randn(2, 16, 8, 8)
    x = gdro.pack_latents(z)
    assert x.shape == (2, 16, 64)
    # token (row r, col c) of the 4 x 4 grid holds channel ch of pixel (dy, dx) of its patch at ch * 4 + dy * 2 + dx
    for r, c, ch, dy, dx in [(0, 0, 0, 0, 0), (1, 2, 3, 0, 1), (3, 3, 15, 1, 1), (2, 0, 7, 1, 0)]:
        assert x[1, r * 4 + c, ch * 4 + dy * 2 + dx] == z[1, ch, 2 * r + dy, 2 * c + dx]
    torch.testing.assert_close(gdro.unpack_latents(x), z, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_an_encoded_image_gives_the_vaes_own_reconstruction(family):
    # decode undoes encode_images' shift, scaling and packing exactly; how close that is to the image itself is the
    # VAE's quality (a tiny random VAE reconstructs nothing, a real one nearly everything)
    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    image = random_image(2)
    (decoded,) = gdro.decode(pipe, fam, families.encode_images(pipe, fam, [image], RES))
    with torch.no_grad():
        z = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mean
        (expected,) = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="pil")
    diff = np.abs(np.asarray(decoded, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert decoded.size == image.size and diff.max() <= 1  # uint8 rounding


def test_images_are_resized_to_the_resolution_and_centre_cropped():
    pipe, fam = gdro.load_pipeline("", tiny=True, family="sd3")
    wide = random_image(3, size=(2 * RES, RES))  # short side already RES: only the crop applies
    centre = wide.crop((RES // 2, 0, RES // 2 + RES, RES))
    small = random_image(4, size=(RES // 2, RES // 2))  # upscaled, bicubic
    got = families.encode_images(pipe, fam, [wide, small], RES)
    expected = torch.cat([vae_reference(pipe, centre), vae_reference(pipe, small.resize((RES, RES), Image.BICUBIC))])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

# ----------------------------------------------------------------------------- the folder, checked before any model


@pytest.fixture
def no_model(monkeypatch):
    """A model load fails the test: every refusal must come first."""
    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(gdro, "load_pipeline", refuse)


def small_folder(folder, groups):
    """groups: {prompt: number of images}; tiny solid-colour PNGs; returns the metadata rows (written too)."""
    rows = []
    for p, (prompt, n) in enumerate(groups.items()):
        for j in range(n):
            name = f"p{p}_{j}.png"
            Image.new("RGB", (8, 8), (40 * j, 100, 200)).save(folder / name)
            rows.append({"file_name": name, "prompt": prompt, "reward": 0.1 * j, "source": "test"})
    write_metadata(folder, rows)
    return rows


BAD_LINES = {  # line 4 of metadata.jsonl (after two good lines and a blank one) -> the refusal's words
    "truncated JSON": ('{"file_name": "p0_0.png", "prompt": "a red sign", "reward": 0.5', "malformed"),
    "no reward": ('{"file_name": "p0_0.png", "prompt": "a red sign"}', "malformed"),
    "no file name": ('{"prompt": "a red sign", "reward": 0.5}', "malformed"),
    "reward not a number": ('{"file_name": "p0_0.png", "prompt": "a red sign", "reward": "high"}', "malformed"),
    "empty prompt": ('{"file_name": "p0_0.png", "prompt": " ", "reward": 0.5}', "malformed"),
    "not an object": ('["p0_0.png", "a red sign", 0.5]', "malformed"),
    "NaN reward": ('{"file_name": "p0_0.png", "prompt": "a red sign", "reward": NaN}', "not a finite number"),
    "infinite reward": ('{"file_name": "p0_0.png", "prompt": "a red sign", "reward": -Infinity}',
                        "not a finite number"),
    "huge reward": ('{"file_name": "p0_0.png", "prompt": "a red sign", "reward": 1e300}', "not a finite number"),
    "reward as a string": ('{"file_name": "p0_0.png", "prompt": "a red sign", "reward": "0.5"}', "malformed"),
    "reward as a boolean": ('{"file_name": "p0_0.png", "prompt": "a red sign", "reward": true}', "malformed"),
    "file outside the folder": ('{"file_name": "../p0_0.png", "prompt": "a red sign", "reward": 0.5}', "outside"),
    "file listed twice": ('{"file_name": "p0_1.png", "prompt": "a red sign", "reward": 0.5}', "listed already"),
    "truncated JPEG": ('{"file_name": "cut.jpg", "prompt": "a red sign", "reward": 0.5}', "cannot read image"),
    "missing image": ('{"file_name": "gone.png", "prompt": "a red sign", "reward": 0.5}', "cannot read image"),
    "unreadable image": ('{"file_name": "broken.png", "prompt": "a red sign", "reward": 0.5}', "cannot read image"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_metadata_line_is_refused_with_its_line_number_before_any_model_loads(tmp_path, no_model, case):
    rows = small_folder(tmp_path, {"a red sign": 2})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])  # its header whole, data cut
    line, words = BAD_LINES[case]
    write_metadata(tmp_path, [*rows, "", line])
    with pytest.raises(gdro.BadInput, match=rf"metadata.jsonl line 4: .*{words}"):
        gdro.main(["--from-images", str(tmp_path), "--tiny", "--out", str(tmp_path / "out"), "--group-size", "2"])
    assert not (tmp_path / "out").exists()  # nothing written either


def test_tiny_shrinks_only_what_an_image_folder_run_uses(capsys):
    args = gdro.parse_args(["--from-images", "d", "--tiny"])
    default = gdro.parse_args(["--from-images", "d"])
    assert (args.images_per_prompt, args.steps) == (default.images_per_prompt, default.steps)  # nothing is sampled
    assert args.resolution == families.TINY_RUN["resolution"] and args.max_steps == families.TINY_RUN["max_steps"]
    said = capsys.readouterr().out.strip().removeprefix("--tiny: ").split(", ")  # what --tiny says it shrank
    assert "resolution=64" in said and not any(s.startswith(("images_per_prompt=", "steps=")) for s in said), said


def test_metadata_that_is_not_utf8_is_refused_naming_the_line(tmp_path, no_model):
    rows = small_folder(tmp_path, {"a red sign": 2})
    text = "".join(json.dumps(r) + "\n" for r in rows).encode() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1")
    (tmp_path / "metadata.jsonl").write_bytes(text)
    with pytest.raises(gdro.BadInput, match=r"metadata.jsonl is not UTF-8 text \(line 3"):
        gdro.main(["--from-images", str(tmp_path), "--tiny", "--out", str(tmp_path / "out"), "--group-size", "2"])


def test_a_folder_without_metadata_is_refused(tmp_path, no_model):
    with pytest.raises(gdro.BadInput, match="metadata.jsonl not found"):
        gdro.main(["--from-images", str(tmp_path), "--tiny", "--out", str(tmp_path / "out")])


def test_prompts_with_fewer_than_k_images_are_skipped_and_counted(tmp_path, no_model, capsys):
    small_folder(tmp_path, {"a red sign": 4, "a green mug": 3, "a blue cake": 5, "a white door": 1})
    gdro.main(["--from-images", str(tmp_path), "--tiny", "--group-size", "4", "--dry-run"])
    out = capsys.readouterr().out
    assert "skipped 2 of 4 prompts with fewer than --group-size 4 images" in out
    plan = json.loads(out.strip().splitlines()[-1])
    assert plan["prompts"] == 2 and plan["images_cached"] == 4 + 5 and plan["images_per_prompt"] == "4-5"
    with pytest.raises(gdro.BadInput, match="no prompt"):  # and a folder with no usable prompt is refused
        gdro.main(["--from-images", str(tmp_path), "--tiny", "--group-size", "6", "--dry-run"])

# ----------------------------------------------------------------------------- end to end (slow)

PROMPTS = {'a shop sign that reads "Open"': 5, 'a mug printed with "Coffee"': 5, 'a neon sign saying "Bar"': 2}
K = 4  # the third prompt has fewer images and is skipped


def image_folder(folder, family):
    """A folder of images drawn by the tiny pipeline, scored by their brightness, in the imagefolder convention."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    rows = []
    for p, (prompt, n) in enumerate(PROMPTS.items()):
        cond, uncond = gdro.encode_prompt(pipe, fam, prompt)
        seeds, guidance = [100 * p + j for j in range(n)], fam.guidance
        x0 = gdro.generate(pipe, fam, cond, uncond, seeds, 2, guidance, RES)
        for j, image in enumerate(gdro.decode(pipe, fam, x0)):
            image.save(folder / f"{p}_{j}.png")
            rows.append({"file_name": f"{p}_{j}.png", "prompt": prompt,
                         "reward": float(np.asarray(image, dtype=np.float32).mean() / 255), "seed": 100 * p + j})
    write_metadata(folder, rows)
    return rows


def from_images(folder, out, *flags):
    return gdro.main(["--from-images", str(folder), "--tiny", "--out", str(out), "--group-size", str(K), *flags])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_training_from_an_image_folder_gives_a_lora_that_loads_and_changes_the_model(tmp_path, family):
    rows = image_folder(tmp_path / "images", family)
    lora_dir = from_images(tmp_path / "images", tmp_path / "out", "--family", family, "--max-steps", "4")
    # the cache: one ordinary shard per kept prompt, each image its VAE encoding, each reward its line's
    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    kept = [p for p, n in PROMPTS.items() if n >= K]
    assert not gdro.shard_path(tmp_path / "out" / "cache", len(kept)).exists()
    for i, prompt in enumerate(kept):
        shard = load_file(gdro.shard_path(tmp_path / "out" / "cache", i))
        mine = [r for r in rows if r["prompt"] == prompt]
        images = [Image.open(tmp_path / "images" / r["file_name"]) for r in mine]
        encoded = families.encode_images(pipe, fam, images, RES)
        torch.testing.assert_close(shard["x0"], encoded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shard["rewards"], torch.tensor([r["reward"] for r in mine]))
        assert "seeds" not in shard and {"prompt_embeds", "pooled_prompt_embeds"} <= set(shard)
    assert json.loads((tmp_path / "out" / "cache" / "manifest.json").read_text())["source"] == "images"
    # the LoRA loads into a fresh pipeline and changes what it draws
    cond, uncond = gdro.encode_prompt(pipe, fam, 'a sign that reads "Hi"')
    before = gdro.generate(pipe, fam, cond, uncond, [7], 2, fam.guidance, RES)
    pipe.load_lora_weights(str(lora_dir))
    after = gdro.generate(pipe, fam, cond, uncond, [7], 2, fam.guidance, RES)
    assert not torch.allclose(before, after, atol=1e-5)


@pytest.mark.slow
def test_an_interrupted_image_cache_resumes_where_it_stopped(tmp_path, monkeypatch):
    image_folder(tmp_path / "images", "sd3")
    straight = from_images(tmp_path / "images", tmp_path / "straight", "--max-steps", "0").parent
    real_encode, calls = families.encode_images, []

    def encode_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(*a, **kw)

    monkeypatch.setattr(families, "encode_images", encode_then_interrupt)
    with pytest.raises(SystemExit, match="1 of 2 prompts are cached"):
        from_images(tmp_path / "images", tmp_path / "stopped", "--max-steps", "0")
    first = gdro.shard_path(tmp_path / "stopped" / "cache", 0).stat().st_mtime_ns
    monkeypatch.setattr(families, "encode_images", real_encode)
    from_images(tmp_path / "images", tmp_path / "stopped", "--max-steps", "0")
    assert gdro.shard_path(tmp_path / "stopped" / "cache", 0).stat().st_mtime_ns == first  # kept, not redone
    for i in range(2):
        a, b = (load_file(gdro.shard_path(d / "cache", i)) for d in (straight, tmp_path / "stopped"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_cache_from_images_and_a_sampled_cache_are_never_mixed(tmp_path):
    image_folder(tmp_path / "images", "sd3")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "reward.py").write_text("def one(images, prompts):\n    return [1.0] * len(images)\n")
    sampled = ["--prompts", str(tmp_path / "prompts.txt"), "--reward", f"{tmp_path / 'reward.py'}:one", "--tiny",
               "--max-steps", "0"]
    from_images(tmp_path / "images", tmp_path / "a", "--max-steps", "0")
    with pytest.raises(gdro.BadInput, match="source='images'"):
        gdro.main([*sampled, "--out", str(tmp_path / "a")])
    gdro.main([*sampled, "--out", str(tmp_path / "b")])
    with pytest.raises(gdro.BadInput, match="source='rollouts'"):
        from_images(tmp_path / "images", tmp_path / "b", "--max-steps", "0")
