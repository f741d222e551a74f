"""The model families GDRO trains, one record each: everything about a model that the method does not care about.

GDRO needs three things of a model: the conditioning of a prompt, the latent layout its transformer consumes, and
the transformer's velocity in one convention, x_t = (1 - t) x0 + t eps, v = eps - x0 (gdro.velocity). Each record
below says how its family does them, and what rollouts and training need around them:

  pipeline      the diffusers pipeline class (it also saves and loads the family's LoRA files)
  hub_names     what a hub id holds to name the family, for --dry-run before anything loads
  guidance, steps, resolution    the rollouts' usual guidance and sampler steps, the model's usual image side
  scheduler     the real model's flow-matching schedule (scheduler_config.json): --tiny's, and training's t
  lora_targets  the attention projections of the image and text streams
  encode_prompt (cond, uncond): cond is cached for training, uncond (the negative prompt) only rollouts use
  sampler_inputs, sampler_latents    the pipeline's arguments for rollouts from cached conditioning, and its
                latents in the cached layout
  velocity      the transformer call, with the family's own sign and time scale turned into the convention
  shift_mu      the exponential shift of t that the family's sampler applies (training's t follows it)
  encode_pixels, decode_latents  the VAE, with the family's latent normalisation, into and out of the cached layout

The defaults in Family are the ways several families share (an AutoencoderKL with a shift and a scaling factor,
the scheduler config's shift); a family overrides what differs. Adding a family is one record here and its tiny
configuration in small_models.build_tiny_pipeline.
"""
import math

import torch

# the attention projections of an MMDiT's image stream (to_*) and text stream (add_*, to_add_out)
MMDIT_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def pack_latents(z):
    """FLUX's layout: [N, C, H, W] VAE latents -> [N, H/2 * W/2, 4C], one token per 2x2 patch (as FluxPipeline;
    Qwen-Image and FLUX.2 pack in the same order)."""
    n, c, h, w = z.shape
    return z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(x):
    """The inverse of pack_latents, for square images."""
    n, seq_len, c4 = x.shape
    side = math.isqrt(seq_len)
    return x.view(n, side, side, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, 2 * side, 2 * side)


def padded(embeds, length):
    """Variable-length text [L_i, D] (a list, or a batch with a mask applied) -> ([n, length, D] zero-padded,
    [n, length] mask of the real tokens): the cache stacks prompts, so each is stored at one length."""
    if any(len(e) > length for e in embeds):
        raise ValueError(f"a prompt of {max(len(e) for e in embeds)} tokens is longer than {length}")
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=embeds[0].device)
    for i, e in enumerate(embeds):
        out[i, :len(e)], mask[i, :len(e)] = e, 1
    return out, mask


def unpadded(cond):
    """The inverse of padded: the list of each row's real tokens (the real tokens come first)."""
    return [e[:n] for e, n in zip(cond["prompt_embeds"], cond["prompt_mask"].sum(1).tolist())]


class Family:
    """A family's record: the fields and methods the module docstring lists. The methods here are the defaults
    several families share; a family's record overrides what differs."""
    name = pipeline = None
    hub_names = ()
    guidance, steps, resolution = None, 10, 1024
    scheduler = {}
    lora_targets = MMDIT_ATTENTION
    packed = False  # the cached latents are a sequence of 2x2-patch tokens ([N, L, 4C]), not a grid ([N, C, H, W])

    def encode_prompt(self, pipe, prompt):
        raise NotImplementedError

    def sampler_inputs(self, cond, uncond, guidance):
        """The pipeline's arguments for cached conditioning (one row per image) at a guidance scale."""
        return {**cond, "guidance_scale": guidance}

    def velocity(self, transformer, x_t, t, cond, guidance):
        raise NotImplementedError

    def sampler_latents(self, pipe, latents):
        """What the pipeline returns with output_type="latent", in the cached layout (most return that layout)."""
        return latents

    def image_tokens(self, latent_shape):
        """The transformer's image tokens for one cached latent of this shape (the dynamic shifts depend on it)."""
        return latent_shape[0] if self.packed else latent_shape[-2] * latent_shape[-1] // 4

    def shift_mu(self, scheduler_config, tokens, steps):
        """mu of the sampler's shift t -> e^mu / (e^mu + 1/t - 1): a fixed shift s is mu = log s; a dynamic shift
        grows linearly with the image's tokens (diffusers' calculate_shift, as the pipelines set it)."""
        c = scheduler_config
        if c.get("use_dynamic_shifting"):
            slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
            return c["base_shift"] + slope * (tokens - c["base_image_seq_len"])
        return math.log(c["shift"])

    def pack(self, z):
        return pack_latents(z) if self.packed else z

    def unpack(self, x):
        return unpack_latents(x) if self.packed else x

    def encode_pixels(self, pipe, pixels):
        """Pixels in [-1, 1] -> clean latents in the cached layout: the VAE's posterior MEAN (no sampling noise),
        shifted and scaled as the sampler's latents are (the exact inverse of decode_latents)."""
        c = pipe.vae.config
        z = pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).latent_dist.mean
        return self.pack((z - c.shift_factor) * c.scaling_factor)

    def decode_latents(self, pipe, latents):
        """Latents in the cached layout -> pixels in [-1, 1]."""
        c = pipe.vae.config
        return pipe.vae.decode(self.unpack(latents).to(pipe.vae.dtype) / c.scaling_factor + c.shift_factor).sample

# ============================================================================= SD3 / SD3.5 (Medium and Large)


class SD3(Family):
    """Two CLIPs + T5, real CFG with the empty negative prompt; latents as the VAE's grid; the transformer takes
    t x 1000 and predicts v."""
    name, pipeline, hub_names = "sd3", "StableDiffusion3Pipeline", ("stable-diffusion-3", "sd3")
    guidance, steps, resolution = 4.5, 10, 1024  # SD3.5-Medium's usual CFG; the paper's 10 rollout steps
    scheduler = dict(shift=3.0)  # a fixed shift

    def encode_prompt(self, pipe, prompt):
        length = min(pipe.tokenizer_3.model_max_length, 256)  # the pipeline's T5 length, or a shorter T5's
        pe, neg_pe, pooled, neg_pooled = pipe.encode_prompt(prompt, None, None, device=pipe.device,
                                                            max_sequence_length=length)
        return ({"prompt_embeds": pe, "pooled_prompt_embeds": pooled},
                {"prompt_embeds": neg_pe, "pooled_prompt_embeds": neg_pooled})

    def sampler_inputs(self, cond, uncond, guidance):
        negative = {"negative_" + k: v for k, v in uncond.items()}
        return {**cond, **negative, "guidance_scale": guidance}

    def velocity(self, transformer, x_t, t, cond, guidance):
        return transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

# ============================================================================= FLUX.1 (dev, schnell)


class Flux(Family):
    """CLIP pooled + T5, distilled guidance embedded in the transformer (dev; schnell has none and ignores it);
    packed 2x2 patches; the transformer takes t itself (it scales t and guidance by 1000) and predicts v."""
    name, pipeline, hub_names = "flux", "FluxPipeline", ("flux",)
    guidance, steps, resolution = 3.5, 10, 1024  # FLUX.1-dev's distilled guidance
    scheduler = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)  # the shift grows with the resolution
    packed = True

    def encode_prompt(self, pipe, prompt):
        length = min(pipe.tokenizer_2.model_max_length, 512)
        pe, pooled, _ = pipe.encode_prompt(prompt, None, device=pipe.device, max_sequence_length=length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}, {}  # guidance-distilled: no uncond

    def velocity(self, transformer, x_t, t, cond, guidance):
        n, seq_len = x_t.shape[:2]
        side = math.isqrt(seq_len)  # square images: the packed latent is a side x side grid of 2x2 patches
        img_ids = torch.zeros(side, side, 3, device=x_t.device)  # FLUX's RoPE position ids: (0, row, col)
        img_ids[..., 1] = torch.arange(side, device=x_t.device)[:, None]
        img_ids[..., 2] = torch.arange(side, device=x_t.device)[None, :]
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x_t.device)
        g = None if guidance is None else torch.full((n,), guidance, device=x_t.device)
        return transformer(hidden_states=x_t, timestep=t, guidance=g, encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_prompt_embeds"], txt_ids=txt_ids,
                           img_ids=img_ids.view(-1, 3), return_dict=False)[0]

# ============================================================================= Qwen-Image


class QwenImage(Family):
    """Qwen2.5-VL's last hidden state (variable length: the cache pads it and keeps a mask), true CFG with the
    negative prompt " " (true_cfg_scale; the pipeline rescales the combination per token); a 3-D VAE of one frame
    normalised per channel; packed 2x2 patches; the transformer takes t itself and predicts v."""
    name, pipeline, hub_names = "qwen-image", "QwenImagePipeline", ("qwen-image",)
    guidance, steps, resolution = 4.0, 10, 1328  # true_cfg_scale 4; 1328 px is its 1:1 size
    scheduler = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                     max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    packed = True
    negative_prompt = " "  # without a negative prompt the pipeline runs no CFG at all
    text_length = 512  # the pipeline's max_sequence_length: no prompt is longer

    def encode_prompt(self, pipe, prompt):
        out = []
        for text in (prompt, self.negative_prompt):
            pe, mask = pipe.encode_prompt(text, device=pipe.device, max_sequence_length=self.text_length)
            real = pe[0] if mask is None else pe[0][mask[0].bool()]  # None: every token is real
            embeds, mask = padded([real], self.text_length)
            out.append({"prompt_embeds": embeds, "prompt_mask": mask})
        return out[0], out[1]

    def sampler_inputs(self, cond, uncond, guidance):
        inputs = {"prompt_embeds": cond["prompt_embeds"], "prompt_embeds_mask": cond["prompt_mask"],
                  "true_cfg_scale": guidance}
        if guidance > 1:
            inputs.update(negative_prompt_embeds=uncond["prompt_embeds"],
                          negative_prompt_embeds_mask=uncond["prompt_mask"])
        return inputs

    def velocity(self, transformer, x_t, t, cond, guidance):
        n, seq_len = x_t.shape[:2]
        side = math.isqrt(seq_len)
        mask = cond["prompt_mask"].to(x_t.device)  # bench.py counts FLOPs on the meta device with a host mask (data)
        return transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                           encoder_hidden_states_mask=mask, img_shapes=[[(1, side, side)]] * n, return_dict=False)[0]

    def latent_stats(self, vae, like):
        """The per-channel mean and std that normalise the VAE's latents, shaped for [N, C, H, W]."""
        c = vae.config
        shape = (1, c.z_dim, 1, 1)
        return torch.tensor(c.latents_mean).view(shape).to(like), torch.tensor(c.latents_std).view(shape).to(like)

    def encode_pixels(self, pipe, pixels):
        z = pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype).unsqueeze(2)).latent_dist.mean[:, :, 0]
        mean, std = self.latent_stats(pipe.vae, z)
        return pack_latents((z - mean) / std)

    def decode_latents(self, pipe, latents):
        z = unpack_latents(latents).to(pipe.vae.dtype)
        mean, std = self.latent_stats(pipe.vae, z)
        return pipe.vae.decode((z * std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0]

# ============================================================================= FLUX.2 [dev]


class Flux2(Family):
    """Mistral-Small-3.1's hidden states 10, 20, 30 per token, at a fixed 512 tokens with no mask (the padding is
    attended, so it is cached as it is); distilled guidance embedded; a VAE whose 2x2-patchified latents are
    normalised by its BatchNorm statistics AFTER packing; the transformer takes t itself and predicts v. Its
    sampler's shift depends on the step count too (compute_empirical_mu), not on the config's base/max shift."""
    name, pipeline, hub_names = "flux2", "Flux2Pipeline", ("flux.2",)
    guidance, steps, resolution = 4.0, 10, 1024
    scheduler = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096, time_shift_type="exponential")
    # the double-stream blocks' MMDiT projections and the single-stream blocks' fused qkv+MLP input and output (the
    # bulk of the model); a plain "to_out" would also name the double blocks' to_out list, so a regex (peft
    # full-matches it against module names)
    lora_targets = (r".*(transformer_blocks\.\d+\.attn\.(" + "|".join(n.replace(".", r"\.") for n in MMDIT_ATTENTION)
                    + r")|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))")
    packed = True
    text_length = 512  # the pipeline's max_sequence_length

    def encode_prompt(self, pipe, prompt):
        pe, _ = pipe.encode_prompt(prompt=prompt, device=pipe.device, max_sequence_length=self.text_length)
        return {"prompt_embeds": pe}, {}  # guidance-distilled: no uncond

    def velocity(self, transformer, x_t, t, cond, guidance):
        n, seq_len = x_t.shape[:2]
        side = math.isqrt(seq_len)
        zero = torch.arange(1)
        # FLUX.2's 4-axis RoPE ids (T, H, W, L): image tokens (0, row, col, 0), text tokens (0, 0, 0, l)
        img_ids = torch.cartesian_prod(zero, torch.arange(side), torch.arange(side), zero).to(x_t.device)
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(cond["prompt_embeds"].shape[1])).to(x_t.device)
        g = None if guidance is None else torch.full((n,), guidance, device=x_t.device)
        return transformer(hidden_states=x_t, timestep=t, guidance=g, encoder_hidden_states=cond["prompt_embeds"],
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def shift_mu(self, scheduler_config, tokens, steps):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
        return compute_empirical_mu(tokens, steps)

    def bn_stats(self, vae, like):
        """The VAE's BatchNorm running mean and std over the packed 4C channels."""
        return vae.bn.running_mean.to(like), torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).to(like)

    def normalised(self, vae, z):
        """Raw VAE latents [N, C, H, W] -> the cached layout: packed 2x2 patches, then each of the 4C channels
        normalised."""
        mean, std = self.bn_stats(vae, z)
        return (pack_latents(z) - mean) / std

    def encode_pixels(self, pipe, pixels):
        return self.normalised(pipe.vae, pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).latent_dist.mean)

    def decode_latents(self, pipe, latents):
        mean, std = self.bn_stats(pipe.vae, latents)
        return pipe.vae.decode(unpack_latents(latents * std + mean).to(pipe.vae.dtype), return_dict=False)[0]

# ============================================================================= FLUX.2 [klein]


class Flux2Klein(Flux2):
    """FLUX.2 [dev]'s transformer, smaller and without a guidance embedding, conditioned on Qwen3's hidden states
    9, 18, 27. The step-distilled klein ignores guidance; klein base runs plain CFG with the empty prompt."""
    name, pipeline, hub_names = "flux2-klein", "Flux2KleinPipeline", ("flux.2-klein",)
    guidance, steps = 1.0, 4  # the distilled klein's 4 steps; klein base: --guidance 4 --steps 50

    def encode_prompt(self, pipe, prompt):
        (pe, _), (neg, _) = (pipe.encode_prompt(prompt=text, device=pipe.device, max_sequence_length=self.text_length)
                             for text in (prompt, ""))
        return {"prompt_embeds": pe}, {"prompt_embeds": neg}

    def sampler_inputs(self, cond, uncond, guidance):
        negative = {"negative_prompt_embeds": uncond["prompt_embeds"]} if guidance > 1 else {}
        return {**cond, **negative, "guidance_scale": guidance}

    def sampler_latents(self, pipe, latents):
        return self.normalised(pipe.vae, latents)  # unlike [dev]'s, this pipeline returns raw VAE latents

# ============================================================================= Z-Image


class ZImage(Family):
    """Qwen3's second-to-last hidden state (variable length: padded and masked in the cache, a list for the model);
    FLUX.1's VAE and its normalisation; latents as the VAE's grid. The transformer takes lists, the time 1 - t, and
    predicts x0 - eps = -v. CFG is v_c + g (v_c - v_u) with the empty prompt: g = 0 (Turbo) is none."""
    name, pipeline, hub_names = "z-image", "ZImagePipeline", ("z-image",)
    guidance, steps, resolution = 0.0, 8, 1024  # Z-Image-Turbo: step-distilled, no CFG
    scheduler = dict(shift=3.0)
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]  # one attention per block, over image and text tokens
    text_length = 512  # the pipeline's max_sequence_length

    def encode_prompt(self, pipe, prompt):
        pe, neg = pipe.encode_prompt(prompt, device=pipe.device, do_classifier_free_guidance=True,
                                     max_sequence_length=self.text_length)
        (c, c_mask), (u, u_mask) = padded(pe, self.text_length), padded(neg, self.text_length)
        return {"prompt_embeds": c, "prompt_mask": c_mask}, {"prompt_embeds": u, "prompt_mask": u_mask}

    def sampler_inputs(self, cond, uncond, guidance):
        negative = {"negative_prompt_embeds": unpadded(uncond)} if guidance > 0 else {}
        return {"prompt_embeds": unpadded(cond), **negative, "guidance_scale": guidance}

    def velocity(self, transformer, x_t, t, cond, guidance):
        out = transformer(list(x_t.unsqueeze(2).unbind(0)), 1 - t, unpadded(cond), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


FAMILIES = {f.name: f for f in (SD3(), Flux(), QwenImage(), Flux2(), Flux2Klein(), ZImage())}


def family_of_pipeline_class(class_name):
    """The family whose pipeline class is named class_name, or None."""
    return next((f.name for f in FAMILIES.values() if f.pipeline == class_name), None)


def family_of_hub_id(model):
    """The family a hub id names (the longest matching name wins: FLUX.2-klein over FLUX.2 over FLUX), or None."""
    found = [(len(n), f.name) for f in FAMILIES.values() for n in f.hub_names if n in model.lower()]
    return max(found)[1] if found else None


def supported():
    """The supported pipelines, for error messages."""
    return ", ".join(f"{f.pipeline} ({f.name})" for f in FAMILIES.values())
