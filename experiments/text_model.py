"""A small StableDiffusion3Pipeline PRETRAINED HERE, on a CPU, to draw a prompt's quoted digits (`the text "482"` ->
an image of 482). OCR can read it, so GDRO's OCR reward moves on it. It is saved with save_pretrained, and gdro.py /
eval.py load it through DiffusionPipeline.from_pretrained(folder) like any model:

    python -m experiments.text_model --out runs/text_model    # about 35 minutes on 2 CPU cores, once; reused afterwards
    python -m experiments.text_model --recipe binding --out runs/text_binding   # 4 digits, all large (BINDING_RECIPE)

Training data: 3-digit strings rendered with Pillow's built-in scalable font (as reward_ocr.py), centred and as
large as fits; like web images, 40 % of them show their text small, somewhere in the frame (too small for OCR to
read at 64 px), so the model inherits an unreadable mode, as real models inherit illegible text. The text encoders
are the tiny pipelines' character-level ones (families.py), frozen at random init; a VAE (64 px -> 4 x 16 x 16) and
an SD3 transformer are trained from scratch with the rectified-flow loss of SD3's own convention (x_t = (1 - t) x0 +
t eps, v = eps - x0, gdro.SD3.velocity, t from gdro.sample_t), with 10 % empty prompts so that classifier-free
guidance works. The strings split three ways (TEXT_SPLITS): train (the model and GDRO learn from them), val (to
choose GDRO's settings), test (held out from everything: eval only).
"""
import itertools
import json
import random
import shutil
import time
from pathlib import Path

import torch

import experiments
import gdro
from families import char_text_configs, char_tokenizers, eval_mode

TEXT_PROMPT = 'the text "{}"'  # ocr.txt's convention: the target in double quotes
TEXT_ALPHABET, TEXT_RESOLUTION = "0123456789", 64
TEXT_SPLITS = {"test": 100, "val": 100}  # strings held out; the other 800 of the 1000 are train
# The whole recipe: changing any value builds a new model (the folder's text_model.json records it). One key may be
# added, train_strings: pretrain on the first N training strings only (the tests' toy model); without it, on all.
TEXT_RECIPE = dict(seed=0, length=3, variants=4, jitter=0.0, small_share=0.4, vae_steps=400, vae_batch=32, vae_lr=1e-3,
                   steps=5000, batch=32, lr=1e-3, warmup=200, ema=0.999, uncond=0.1, layers=6, heads=4, head_dim=32,
                   clip_length=32, t5_length=32, shift=1.0)
# A second model, whose failure is binding rather than a mode: 4-digit strings (rewards take 5 values, so fewer groups
# tie), every render large and jittered in size and place, so its images are legible digits, often the wrong ones or
# in the wrong place; copying a group's best image does not remove that. Fewer steps: it must build in 40 minutes.
BINDING_RECIPE = {**TEXT_RECIPE, "length": 4, "variants": 2, "jitter": 0.5, "small_share": 0.0, "steps": 3000}
RECIPES = {"mode": TEXT_RECIPE, "binding": BINDING_RECIPE}


def text_strings(seed=0, length=TEXT_RECIPE["length"]):
    """{split: [strings]}: every string of `length` characters of TEXT_ALPHABET, shuffled once by seed and split."""
    strings = ["".join(s) for s in itertools.product(TEXT_ALPHABET, repeat=length)]
    random.Random(seed).shuffle(strings)
    splits, start = {}, 0
    for name, n in TEXT_SPLITS.items():
        splits[name], start = sorted(strings[start:start + n]), start + n
    splits["train"] = sorted(strings[start:])
    return splits


def render(text, rng, size=TEXT_RESOLUTION, jitter=0.0, small=False):
    """Dark text on white, as large as fits 90 % of the width, centred. jitter (0-1) shrinks it by up to 25 % and
    moves it by up to 4 px, drawn from rng (a random.Random). small: the text shrunk to 35-50 % of that and put
    anywhere in the frame, as text in a photo often is (at 64 px, too small for OCR to read after the VAE)."""
    from PIL import Image, ImageDraw, ImageFont
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    width = lambda s: draw.textbbox((0, 0), text, font=ImageFont.load_default(size=s))[2]
    font_size = min(size, int(0.9 * size * size / width(size)))
    while font_size < size and width(font_size + 1) <= 0.9 * size:
        font_size += 1
    while width(font_size) > 0.9 * size:
        font_size -= 1
    font = ImageFont.load_default(size=max(8, round(font_size * (1 - 0.25 * jitter * rng.random()))))
    box = draw.textbbox((0, 0), text, font=font)
    slack_x, slack_y = (size - (box[2] - box[0])) / 2, (size - (box[3] - box[1])) / 2
    x = slack_x - box[0] + jitter * rng.uniform(-1, 1) * min(4, slack_x)
    y = slack_y - box[1] + jitter * rng.uniform(-1, 1) * min(4, slack_y)
    draw.text((x, y), text, font=font, fill=(20, 20, 20))
    if small:
        side = round(size * rng.uniform(0.35, 0.5))
        shrunk, img = img.resize((side, side), Image.LANCZOS), Image.new("RGB", (size, size), "white")
        img.paste(shrunk, (rng.randint(0, size - side), rng.randint(0, size - side)))
    return img


def large_text(img, share=0.625):
    """Whether an image's ink spans more than share of its width: a large render (90 % of the width) rather than a
    small one (at most 45 %). Ink: pixels whose distance from the median (the background) is over half the largest."""
    import numpy as np
    gray = np.asarray(img.convert("L"), dtype=np.float32)
    dev = np.abs(gray - np.median(gray))
    columns = np.flatnonzero((dev > 0.5 * dev.max()).any(axis=0))  # none in a blank image
    return bool(len(columns) and columns[-1] - columns[0] + 1 > share * gray.shape[1])


def to_pixels(images):
    """PIL images -> [N, 3, H, W] in [-1, 1], the VAE's input."""
    import numpy as np
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def train_vae(pixels, r):
    """An AutoencoderKL (64 px -> 4 x 16 x 16) trained to reconstruct the renders (L2 + a small KL)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(r["seed"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        sample_size=TEXT_RESOLUTION)
    opt = torch.optim.AdamW(vae.parameters(), lr=r["vae_lr"])
    gen = torch.Generator().manual_seed(r["seed"])
    for _ in (bar := gdro.progress(range(r["vae_steps"]), "text model: VAE", "step")):
        x = pixels[torch.randint(len(pixels), (r["vae_batch"],), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        loss = (vae.decode(z).sample - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return vae.eval().requires_grad_(False)


def train_text_transformer(pipe, x0, cond, uncond, r, state_file):
    """SD3's rectified-flow pretraining of pipe.transformer on cached latents x0 [N, V, C, h, w] (V renders
    of each of N strings) and their prompts' conditioning cond {name: [N, ...]}; uncond: the empty prompt's. The
    EMA of the weights is what draws. A checkpoint every 500 steps; the batches are keyed by step, so an
    interrupted build resumes where it stopped and ends with the same weights."""
    transformer, config = pipe.transformer, dict(pipe.scheduler.config)
    transformer.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    opt = torch.optim.AdamW(transformer.parameters(), lr=r["lr"], weight_decay=0.0)
    start = 0
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        transformer.load_state_dict(state["model"]), opt.load_state_dict(state["optimizer"])
        ema, start = state["ema"], state["step"]
    n, v = x0.shape[:2]
    for step in (bar := gdro.progress(range(start, r["steps"]), "text model: transformer", "step", initial=start,
                                     total=r["steps"])):
        gen = gdro.keyed_generator(r["seed"], "pretrain", step)
        i, j = torch.randint(n, (r["batch"],), generator=gen), torch.randint(v, (r["batch"],), generator=gen)
        drop = torch.rand(r["batch"], generator=gen) < r["uncond"]  # empty prompts teach the unconditional velocity
        c = {k: torch.where(drop.view(-1, *[1] * (cond[k].dim() - 1)), uncond[k], cond[k][i]) for k in cond}
        x, eps = x0[i, j], torch.randn(x0[i, j].shape, generator=gen)
        t = gdro.sample_t(r["batch"], gdro.schedule_mu(gdro.family_record("sd3"), config, x.shape[1:], None), gen)
        t_ = t.view(-1, 1, 1, 1)
        v_model = gdro.SD3().velocity(transformer, (1 - t_) * x + t_ * eps, t, c)
        loss = (v_model - (eps - x)).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = r["lr"] * min(1.0, (step + 1) / r["warmup"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, p in transformer.state_dict().items():
                ema[k].lerp_(p, 1 - r["ema"]) if p.is_floating_point() else ema[k].copy_(p)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % 500 == 0 and step + 1 < r["steps"]:
            gdro.write_atomic(state_file, serialize({"model": transformer.state_dict(), "ema": ema,
                                                     "optimizer": opt.state_dict(), "step": step + 1}))
    transformer.load_state_dict(ema)
    transformer.eval().requires_grad_(False)


def serialize(obj):
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_text_prompts(folder, r):
    """folder/{train,val,test}.txt: one prompt per string of each split of recipe r."""
    for name, strings in text_strings(r["seed"], r["length"]).items():
        (Path(folder) / f"{name}.txt").write_text("".join(TEXT_PROMPT.format(s) + "\n" for s in strings))


def model_record(recipe):
    """What text_model.json records of a build: a folder holding another record holds another model."""
    return {"recipe": {**TEXT_RECIPE, **(recipe or {})}, "prompt": TEXT_PROMPT, "alphabet": TEXT_ALPHABET,
            "resolution": TEXT_RESOLUTION, "splits": TEXT_SPLITS}


def pretrain_sd3(vae, pixels, prompts, r, resolution, state_file):
    """A StableDiffusion3Pipeline of r's sizes with the character-level text encoders (frozen at random init) around a
    trained VAE, its transformer pretrained on the pixels [P * variants, 3, H, W] of the prompts (r["variants"] each)
    with the rectified-flow loss; the VAE's latent normalisation set from them. (The text model's and the scene
    model's shared stage: their renders differ, not how a pipeline learns to draw them.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    clip_tok, t5_tok = char_tokenizers(r["clip_length"], r["t5_length"])
    clip, t5 = char_text_configs(clip_tok, t5_tok)
    torch.manual_seed(r["seed"])
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=resolution // 4, patch_size=2, in_channels=4,
            out_channels=4, num_layers=r["layers"], attention_head_dim=r["head_dim"], num_attention_heads=r["heads"],
            joint_attention_dim=t5.d_model, caption_projection_dim=r["heads"] * r["head_dim"],
            pooled_projection_dim=2 * clip.projection_dim, pos_embed_max_size=resolution // 8),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=r["shift"]), vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=clip_tok,
        text_encoder_3=T5EncoderModel(t5), tokenizer_3=t5_tok)
    eval_mode(pipe)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    # the latent normalisation SD3's pipeline applies: (z - shift) * scale has unit variance over the renders
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    x0 = ((z - vae.config.shift_factor) * vae.config.scaling_factor).view(len(prompts), r["variants"], *z.shape[1:])
    sd3 = gdro.family_record("sd3")
    conds = [gdro.encode_prompt(pipe, sd3, p)[0] for p in prompts]
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    _, uncond = gdro.encode_prompt(pipe, sd3, prompts[0])  # the empty prompt, as CFG uses
    train_text_transformer(pipe, x0, cond, uncond, r, state_file)
    return pipe


def build_text_model(folder, recipe=None):
    """The pretrained text model in `folder` (a diffusers folder: DiffusionPipeline.from_pretrained(folder) loads it),
    built once: a folder that already holds this recipe's model is reused. Returns the folder."""
    from diffusers import AutoencoderKL
    r, folder = {**TEXT_RECIPE, **(recipe or {})}, Path(folder)
    record, done = model_record(r), folder / "text_model.json"
    if done.is_file():
        if json.loads(done.read_text()).get("record") != record:
            raise gdro.BadInput(f"{folder} holds a text model of another recipe (its text_model.json); use another "
                                "folder, or delete it to rebuild")
        return folder
    t0, work = time.time(), folder / "build"  # work: the stages' results, so an interrupted build resumes
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(r["seed"])
    train_strings = text_strings(r["seed"], r["length"])["train"][:r.get("train_strings")]  # a test's few, or all
    images = [render(s, rng, jitter=r["jitter"], small=rng.random() < r["small_share"])
              for s in gdro.progress(train_strings, "text model: render", "string") for _ in range(r["variants"])]
    pixels = to_pixels(images)
    if (work / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)
    else:
        vae = train_vae(pixels, r)
        vae.save_pretrained(work / "vae")
    prompts = [TEXT_PROMPT.format(s) for s in train_strings]
    pipe = pretrain_sd3(vae, pixels, prompts, r, TEXT_RESOLUTION, work / "transformer_state.pt")
    pipe.save_pretrained(folder)
    write_text_prompts(folder, r)
    done.write_text(json.dumps({"record": record, "build_seconds": round(time.time() - t0)}, indent=2))
    shutil.rmtree(work)  # the stages' checkpoints: the model is whole now
    return folder


# What --set accepts for each TEXT_RECIPE value; 3 characters at least, so that the strings outnumber the 200 held out,
# and at most 6, so that listing every string stays cheap
RECIPE_RULES = {**{key: experiments.AT_LEAST_1 for key, value in TEXT_RECIPE.items() if isinstance(value, int)},
                **{key: experiments.POSITIVE for key in ("vae_lr", "lr", "shift")},
                **{key: experiments.SHARE for key in ("jitter", "small_share", "uncond")},
                "seed": experiments.AT_LEAST_0, "length": (lambda x: 3 <= x <= 6, "3 to 6 (1000 to a million strings)"),
                "ema": (lambda x: 0 <= x < 1, "at least 0 and below 1")}


def check_folder(folder, recipe):
    """--out: a folder that holds no text model, or one of this recipe (then it is reused)."""
    experiments.check_out(folder)
    done = Path(folder) / "text_model.json"
    if done.is_file() and json.loads(done.read_text()).get("record") != model_record(recipe):
        raise gdro.BadInput(f"--out {folder} holds a text model of another recipe (its text_model.json); use another "
                            "folder, or delete it to rebuild")


def main(argv=None):
    p = experiments.Parser(description="Pretrain the small text-rendering model on CPU (once; reused afterwards).")
    p.add_argument("--out", default="runs/text_model", help="model folder (default: %(default)s)")
    p.add_argument("--recipe", choices=RECIPES, default="mode",
                   help="mode: 3 digits, 40 %% small (unreadable) renders; binding: 4 digits, all large, jittered")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change a TEXT_RECIPE value, e.g. steps=100")
    args = p.parse_args(argv)
    recipe = {**RECIPES[args.recipe], **experiments.key_values("--set", args.set, TEXT_RECIPE, RECIPE_RULES)}
    check_folder(args.out, recipe)
    print(f"text model in {build_text_model(args.out, recipe)}")


if __name__ == "__main__":
    gdro.cli(main)
