"""What gdro.py loads only when asked, never importing gdro back: more model families, --tiny's random pipelines,
--from-images' image folders, and the extras (samplers, compiled blocks, a quantized base, trackers).

- The families beyond the paper's two (SD3 / SD3.5 and FLUX.1, which live in gdro.py): Qwen-Image, FLUX.2 [dev]
  and [klein], Z-Image. Each record here says only what its family does differently; gdro.py completes it with its
  Family class (the defaults: the interface, docs/models.md) when a pipeline of it loads, so that a record reads
  like gdro.SD3 and gdro.Flux. Adding a family is one record in RECORDS and its tiny pipeline in TINY_BUILDERS.
- build_tiny_pipeline(record): a tiny RANDOM pipeline of a family's diffusers classes, text encoders and tokenizers
  included, built from configs with no download (--tiny, the tests, the benchmark). It draws noise: it proves the
  plumbing, not that anything learns. TINY_RUN: the run --tiny shrinks to. With --reward geneval, --tiny's random
  Mask2Former and CLIP of the real classes (tiny_geneval_reward).
- read_image_folder, encode_images: --from-images' metadata.jsonl and images, every line checked; the images
  resized, cropped and encoded with the family's VAE step.
- check_extras, make_scheduler, compile_transformer, quantize, check_report_to, report_to: the extras' checks (with
  the other flags), --sampler's multistep solvers, --compile's blocks, --quantize's frozen base with int8 or NF4
  weights, --report-to's settings and its TensorBoard or W&B log; their packages (torchao, bitsandbytes,
  tensorboard, wandb) imported only here, when asked for.
"""
import contextlib
import importlib.util
import json
import math
import numbers
import os
import sys
import tempfile
from pathlib import Path

import torch

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



# ============================================================================= Qwen-Image


class QwenImage:
    """Qwen2.5-VL's last hidden state (variable length: the cache pads it and keeps a mask), true CFG with the
    negative prompt " " (true_cfg_scale; the pipeline rescales the combination per token); a 3-D VAE of one frame
    normalised per channel; packed 2x2 patches; the transformer takes t itself and predicts v."""
    name, pipeline, hub_names = "qwen-image", "QwenImagePipeline", ("qwen-image",)
    guidance, steps = 4.0, 10  # true_cfg_scale 4; its usual side is 1328 px (1:1)
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
        return self.pack((z - mean) / std)

    def decode_latents(self, pipe, latents):
        z = self.unpack(latents).to(pipe.vae.dtype)
        mean, std = self.latent_stats(pipe.vae, z)
        return pipe.vae.decode((z * std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0]

# ============================================================================= FLUX.2 [dev]


class Flux2:
    """Mistral-Small-3.1's hidden states 10, 20, 30 per token, at a fixed 512 tokens with no mask (the padding is
    attended, so it is cached as it is); distilled guidance embedded; a VAE whose 2x2-patchified latents are
    normalised by its BatchNorm statistics AFTER packing; the transformer takes t itself and predicts v. Its
    sampler's shift depends on the step count too (compute_empirical_mu), not on the config's base/max shift."""
    name, pipeline, hub_names = "flux2", "Flux2Pipeline", ("flux.2",)
    guidance, steps = 4.0, 10
    scheduler = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096, time_shift_type="exponential")
    packed = True
    text_length = 512  # the pipeline's max_sequence_length

    @property
    def lora_targets(self):
        """The double-stream blocks' MMDiT projections (gdro.Family's) and the single-stream blocks' fused qkv+MLP
        input and output (the bulk of the model): a regex, since a plain "to_out" would also name the double blocks'
        to_out list (peft full-matches it against module names)."""
        mmdit = "|".join(n.replace(".", r"\.") for n in super().lora_targets)
        single = r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
        return rf".*(transformer_blocks\.\d+\.attn\.({mmdit})|{single})"

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
        return (self.pack(z) - mean) / std

    def encode_pixels(self, pipe, pixels):
        return self.normalised(pipe.vae, pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).latent_dist.mean)

    def decode_latents(self, pipe, latents):
        mean, std = self.bn_stats(pipe.vae, latents)
        return pipe.vae.decode(self.unpack(latents * std + mean).to(pipe.vae.dtype), return_dict=False)[0]

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


class ZImage:
    """Qwen3's second-to-last hidden state (variable length: padded and masked in the cache, a list for the model);
    FLUX.1's VAE and its normalisation; latents as the VAE's grid. The transformer takes lists, the time 1 - t, and
    predicts x0 - eps = -v. CFG is v_c + g (v_c - v_u) with the empty prompt: g = 0 (Turbo) is none."""
    name, pipeline, hub_names = "z-image", "ZImagePipeline", ("z-image",)
    guidance, steps = 0.0, 8  # Z-Image-Turbo: step-distilled, no CFG
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



RECORDS = (QwenImage, Flux2, Flux2Klein, ZImage)

# ============================================================================= tiny random pipelines (--tiny)


def char_tokenizers(clip_length=77, t5_length=None):
    """Character-level CLIP and T5 tokenizers (every printable ASCII character a token), built with no download."""
    from transformers import CLIPTokenizer, T5TokenizerFast
    chars = [chr(c) for c in range(33, 127)]
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        clip_vocab.setdefault(c, len(clip_vocab)), clip_vocab.setdefault(c + "</w>", len(clip_vocab))
    clip_tok = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=clip_length)
    t5_tok = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
                             + [(c, -2.0) for c in chars] + [("\u2581" + c, -2.0) for c in chars], extra_ids=0,
                             **({} if t5_length is None else {"model_max_length": t5_length}))
    return clip_tok, t5_tok


def char_text_configs(clip_tok, t5_tok):
    """Configs of two-layer CLIP and T5 text encoders for the character tokenizers (random weights)."""
    from transformers import CLIPTextConfig, T5Config
    clip = CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                          max_position_embeddings=max(77, clip_tok.model_max_length))
    t5 = T5Config(vocab_size=len(t5_tok), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return clip, t5


# Qwen3's chat template, cut down to what the pipelines use: one user message, the generation prompt, and
# enable_thinking=False's empty think block
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
# Mistral-Small-3.1's chat template, cut down to what Flux2Pipeline sends: a system and a user message of text chunks
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
    "[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}")


def byte_level_vocab(specials):
    """A vocabulary of the special tokens and every byte (byte-level BPE with no merges: a token per byte)."""
    from tokenizers import pre_tokenizers
    vocab = {token: i for i, token in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    return vocab


def qwen_tokenizer():
    """A Qwen2Tokenizer (Qwen-Image's, FLUX.2 [klein]'s and Z-Image's class) of bytes and Qwen's chat tokens."""
    from transformers import Qwen2Tokenizer
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = Qwen2Tokenizer(vocab=byte_level_vocab(specials), merges=[], model_max_length=1024,
                         additional_special_tokens=specials[1:])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def mistral_processor():
    """A PixtralProcessor (what FLUX.2 [dev] loads for Mistral-Small-3.1) around a byte tokenizer with Mistral's
    special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                "[IMG_BREAK]", "[IMG_END]"]
    bpe = Tokenizer(models.BPE(vocab=byte_level_vocab(specials), merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:], model_max_length=512,
                                  padding_side="left")
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tok, patch_size=6,
                            chat_template=MISTRAL_CHAT_TEMPLATE)


def eval_mode(pipe):
    for module in pipe.components.values():  # models built from configs start in train mode (dropout on)
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


# the VAE of the tiny pipelines: 64 px -> 16 latent channels at 16 x 16
TINY_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                sample_size=64, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3(scheduler):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    clip_tok, t5_tok = char_tokenizers()
    clip, t5 = char_text_configs(clip_tok, t5_tok)
    return StableDiffusion3Pipeline(  # (built in this order: the seed gives each model the same weights as before)
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16,
            num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32),
        scheduler=scheduler, vae=AutoencoderKL(**TINY_VAE, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=clip_tok,
        text_encoder_3=T5EncoderModel(t5), tokenizer_3=t5_tok)


def tiny_flux(scheduler):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel
    clip_tok, t5_tok = char_tokenizers()
    clip, t5 = char_text_configs(clip_tok, t5_tok)
    return FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        scheduler=scheduler, vae=AutoencoderKL(**TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(clip), tokenizer=clip_tok, text_encoder_2=T5EncoderModel(t5), tokenizer_2=t5_tok)


def tiny_qwen_image(scheduler):
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tok = qwen_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end", "image_pad",
                                                                       "video_pad")}
    text = Qwen2_5_VLConfig(  # Qwen2.5-VL-7B's classes; the pipeline takes the last hidden state
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}, rope_theta=1e6,
                         pad_token_id=0, bos_token_id=0, eos_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"])
    return QwenImagePipeline(
        text_encoder=Qwen2_5_VLForConditionalGeneration(text), tokenizer=tok,
        transformer=QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
        # one frame of a 3-D VAE; the real latents_mean / latents_std (its defaults), 4x down as the other VAEs here
        vae=AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                   temperal_downsample=[False, True]),
        scheduler=scheduler)


def tiny_flux2_transformer(guidance_embeds):
    from diffusers import Flux2Transformer2DModel
    return Flux2Transformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * 16,
                                   timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds)


def tiny_flux2_vae():
    """AutoencoderKLFlux2 with random BatchNorm statistics: at their initial 0 and 1 a normalisation left out, or
    applied before packing instead of after, would go unseen."""
    from diffusers import AutoencoderKLFlux2
    vae = AutoencoderKLFlux2(**{**TINY_VAE, "use_quant_conv": True, "use_post_quant_conv": True})
    vae.bn.running_mean.copy_(torch.randn(64) * 0.5)
    vae.bn.running_var.copy_(torch.rand(64) + 0.5)
    return vae


def tiny_flux2(scheduler):
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    processor = mistral_processor()
    tok = processor.tokenizer
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = Mistral3Config(  # 30 layers: the pipeline concatenates hidden states 10, 20 and 30 (hidden size 16 each)
        text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=1024, rope_theta=1e9, sliding_window=None, **special),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, image_size=30, patch_size=6, num_channels=3, head_dim=8),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1, **special)
    return Flux2Pipeline(text_encoder=Mistral3ForConditionalGeneration(text), tokenizer=processor,
                         transformer=tiny_flux2_transformer(guidance_embeds=True), vae=tiny_flux2_vae(),
                         scheduler=scheduler)


def tiny_flux2_klein(scheduler):
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tok = qwen_tokenizer()
    text = Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                       pad_token_id=0, tie_word_embeddings=True)  # 28 layers: hidden states 9, 18, 27
    return Flux2KleinPipeline(text_encoder=Qwen3ForCausalLM(text), tokenizer=tok,
                              transformer=tiny_flux2_transformer(guidance_embeds=False), vae=tiny_flux2_vae(),
                              scheduler=scheduler, is_distilled=True)


def tiny_z_image(scheduler):
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model
    tok = qwen_tokenizer()
    text = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       pad_token_id=0)  # Qwen3-4B's class; the pipeline takes the second-to-last hidden state
    return ZImagePipeline(
        text_encoder=Qwen3Model(text), tokenizer=tok,
        transformer=ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64,
                                             n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                             axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64]),
        vae=AutoencoderKL(**TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE normalisation
        scheduler=scheduler)


TINY_BUILDERS = {"sd3": tiny_sd3, "flux": tiny_flux, "qwen-image": tiny_qwen_image, "flux2": tiny_flux2,
                 "flux2-klein": tiny_flux2_klein, "z-image": tiny_z_image}


def build_tiny_pipeline(record, seed=0):
    """A tiny random pipeline of the family's real diffusers classes (gdro's record of it: its name and scheduler
    config), built from configs with no download, tokenizers included. The same seed gives the same weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    if record.name not in TINY_BUILDERS:
        raise ValueError(f"unknown family {record.name!r}: expected one of {', '.join(TINY_BUILDERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = TINY_BUILDERS[record.name](FlowMatchEulerDiscreteScheduler(**record.scheduler))
    pipe.set_progress_bar_config(disable=True)
    return eval_mode(pipe)


# --tiny shrinks the run for a CPU (flags given explicitly win)
def tiny_geneval_reward(folder):
    """--tiny --reward geneval: reward_geneval's GenevalReward on save_tiny_geneval_models' random models (folder)."""
    import reward_geneval
    detector, clip = save_tiny_geneval_models(folder)
    return reward_geneval.GenevalReward(detector, clip, side=64)  # the tiny detector's own input side


def save_tiny_geneval_models(folder):
    """--tiny --reward geneval: a random Mask2Former (a tiny Swin, COCO's 80 labels as detector configs name them) and
    a random CLIP (a character vocabulary), saved with save_pretrained in folder/detector and folder/clip like a
    user's local copies; returns their two folders."""
    import reward_geneval
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
                              Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor,
                              SwinConfig)
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config_name = {geneval: name for name, geneval in reward_geneval.DETECTOR_ALIASES.items()}  # "mouse", ...
    labels = dict(enumerate(config_name.get(c, c) for c in reward_geneval.COCO_CLASSES))
    config = Mask2FormerConfig(backbone_config=swin, num_queries=8, hidden_dim=32, mask_feature_size=32,
                               feature_size=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, encoder_feedforward_dim=32, num_labels=len(labels), id2label=labels)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(root / "detector")
    Mask2FormerImageProcessor().save_pretrained(root / "detector")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz-":  # every character, alone and word-final: no merges needed
        vocab.update({c: len(vocab), c + "</w>": len(vocab) + 1})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    clip = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1),
                      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(clip).save_pretrained(root / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    return str(root / "detector"), str(root / "clip")


TINY_RUN = dict(resolution=64, max_prompts=4, images_per_prompt=8, steps=4, groups_per_step=2,
                max_steps=20, lora_rank=8, log_every=5, save_every=10)


def shrink_if_tiny(args, argv, settings=TINY_RUN, say=True):
    """--tiny shrinks the run for CPU to settings; every flag given explicitly in argv (None: the command line's)
    still wins, and an image folder (--from-images) keeps its own group sizes. Says what it shrank (if say), returns
    it."""
    if not args.tiny:
        return {}
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
    own = ("images_per_prompt", "steps") if getattr(args, "from_images", None) else ()
    shrunk = {k: v for k, v in settings.items() if k not in own and "--" + k.replace("_", "-") not in given}
    vars(args).update(shrunk)
    if shrunk and say:
        print("--tiny: " + ", ".join(f"{k}={v}" for k, v in shrunk.items()))
    return shrunk

# ============================================================================= your own images (--from-images)


@torch.no_grad()
def encode_images(pipe, record, images, resolution, batch=8):
    """--from-images: images (PIL images or files) -> clean latents in the cache's layout, each resized so its short
    side is `resolution` and centre-cropped, then encoded `batch` at a time by the family record's VAE step
    (gdro.decode's inverse)."""
    from PIL import Image
    squares = []
    for image in images:
        image = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
        scale = resolution / min(image.size)
        w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.resize((w, h), resample=Image.BICUBIC)
        squares.append(image.crop((left, top, left + resolution, top + resolution)))
    preprocess = lambda part: pipe.image_processor.preprocess(part, height=resolution, width=resolution)
    return torch.cat([record.encode_pixels(pipe, preprocess(squares[j:j + batch]))
                      for j in range(0, len(squares), batch)])


MAX_REWARD = 1e6  # |reward| bound: the loss divides rewards by --tau, and a softmax of 1e308 / 0.05 is NaN


def read_image_folder(folder, read_lines, group_size, say=True):
    """--from-images: DIR/metadata.jsonl (Hugging Face "imagefolder": one JSON object per image with file_name,
    prompt, reward), its text read by read_lines (gdro.py's reader of prompt files, as strict) -> (prompts, groups):
    each prompt's images in order of first appearance, as [(file, reward)]; prompts with fewer than group_size images
    are skipped (said if say). Every line and image is checked (each image decoded whole) before any model loads: a
    fault is a ValueError naming the line."""
    from PIL import Image
    folder, groups, seen = Path(folder).resolve(), {}, {}
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(f"--from-images: {meta} not found (one JSON line per image: file_name, prompt, reward)")
    for n, line in read_lines(meta, "--from-images"):
        try:
            row = json.loads(line)
            name, prompt, reward = row["file_name"], row["prompt"], row["reward"]
            assert isinstance(name, str) and name, "file_name must be a non-empty string"
            assert isinstance(prompt, str) and prompt.strip(), "prompt must be a non-empty string"
            assert isinstance(reward, numbers.Real) and not isinstance(reward, bool), "reward must be a number"
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
            raise ValueError(f"{meta} line {n}: malformed ({type(e).__name__}: {e}); expected "
                             '{"file_name": ..., "prompt": ..., "reward": <number>}')
        if not (math.isfinite(reward) and abs(reward) <= MAX_REWARD):
            raise ValueError(f"{meta} line {n}: the reward {reward} is not a finite number of at most {MAX_REWARD:g}")
        file = (folder / name).resolve()
        if not file.is_relative_to(folder):
            raise ValueError(f"{meta} line {n}: file_name {name!r} is outside {folder}")
        if file in seen:
            raise ValueError(f"{meta} line {n}: file_name {name!r} is listed already, on line {seen[file]}")
        seen[file] = n
        try:
            with Image.open(file) as im:
                im.load()  # decodes the pixels: verify() alone passes a truncated JPEG
        except Exception as e:
            raise ValueError(f"{meta} line {n}: cannot read image {file} ({type(e).__name__}: {e})")
        groups.setdefault(prompt.strip(), []).append((file, float(reward)))
    kept = {p: g for p, g in groups.items() if len(g) >= group_size}
    if not kept:
        raise ValueError(f"--from-images: no prompt in {meta} has --group-size {group_size} images or more")
    if say and len(kept) < len(groups):
        print(f"--from-images: skipped {len(groups) - len(kept)} of {len(groups)} prompts with fewer than --group-size "
              f"{group_size} images")
    return list(kept), list(kept.values())


# ============================================================================= extras
# --sampler's multistep solvers, --compile's blocks, --quantize's base, --report-to's log

# --sampler: name -> (diffusers scheduler, its settings), solvers of the same flow-matching ODE. GDRO does not care
# which drew the cache: a second-order one is free speed (docs/cost.md: distance to 200 steps)
SAMPLERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {}),
            "dpm++2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
            "unipc": ("UniPCMultistepScheduler", dict(solver_order=2))}


def make_scheduler(name, config):
    """--sampler's solver SAMPLERS[name] for a model whose Euler scheduler has `config`: multistep solvers in
    diffusers' flow mode on the same shifted schedule, keeping keys they do not know (FLUX's, read by its pipeline) in
    their config."""
    import diffusers
    cls, settings = SAMPLERS[name]
    if cls == "FlowMatchEulerDiscreteScheduler":
        return getattr(diffusers, cls).from_config(config)
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config.get("shift", 1.0),
                use_dynamic_shifting=bool(config.get("use_dynamic_shifting")))
    scheduler = getattr(diffusers, cls)(num_train_timesteps=config.get("num_train_timesteps", 1000), **flow, **settings)
    scheduler.register_to_config(**{k: v for k, v in config.items() if k not in scheduler.config and k[0] != "_"})
    return scheduler

def compile_transformer(transformer, **options):
    """--compile: block by block, as diffusers' compile_repeated_blocks (blocks of a kind share their compiled code)."""
    for child in transformer.children():
        if isinstance(child, torch.nn.ModuleList):  # transformer_blocks, FLUX's single_transformer_blocks
            for block in child:
                block.compile(**options)

def quantize(transformer, kind, model, device):
    """--quantize: the frozen transformer loaded again with int8 (torchao, weight-only) or NF4 (bitsandbytes) weights
    through diffusers' quantization configs, its other layers in its dtype; from `model` (a hub id or folder of the
    pipeline), or with model None from this transformer saved first (--tiny's random one, a benchmark's). The LoRA
    added afterwards stays fp32 and starts at zero: policy == reference at init still."""
    import diffusers
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        config = diffusers.TorchAoConfig(Int8WeightOnlyConfig())
    else:
        config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            transformer.save_pretrained(tmp)
        cls, dtype = type(transformer), transformer.to("cpu").dtype  # its GPU memory freed before the copy loads
        quantized = cls.from_pretrained(model or tmp, subfolder=model and "transformer",
                                        quantization_config=config, torch_dtype=dtype)
    return quantized.to(device) if kind == "int8" else quantized  # bitsandbytes puts it on the GPU itself


def check_extras(args, quantize_package):
    """gdro.check_args' checks of the extras asked for: None if they can run here, else the refusal's line. --sampler
    names a solver; --quantize-rollouts needs --quantize, NF4 and --compile a CUDA GPU (--compile Triton too);
    --quantize and --report-to their packages (a --dry-run's plan needs none), W&B online its login and server."""
    if args.sampler not in SAMPLERS:
        return f"--sampler {args.sampler}: must be one of {', '.join(SAMPLERS)}"
    if args.quantize_rollouts and args.quantize == "none":
        return "--quantize-rollouts True: must be with --quantize int8/nf4"
    if args.quantize == "nf4" and not args.dry_run and not torch.cuda.is_available():
        return "--quantize nf4: must be int8 without CUDA"
    if args.compile and not (torch.cuda.is_available() and importlib.util.find_spec("triton")):
        return "--compile needs a CUDA GPU with Triton (torch.compile's GPU backend); drop the flag here"
    packages = {"--quantize": (args.quantize, quantize_package), "--report-to": (args.report_to, args.report_to)}
    for flag, (value, package) in packages.items():
        if package not in (None, "none") and not args.dry_run and not importlib.util.find_spec(package):
            return f"{flag} {value} needs {package}: pip install {package}"
    problem = not args.dry_run and check_report_to(args.report_to)
    return f"--report-to {args.report_to}: {problem}" if problem else None


WANDB_OFFLINE = ("offline", "disabled", "dryrun")  # WANDB_MODE values that need no account or network


def check_report_to(kind, timeout_s=5.0):
    """--report-to's settings, checked with the other flags (before the cache is built): None if usable, else what is
    wrong. W&B online needs credentials (WANDB_API_KEY, or `wandb login`'s netrc entry) and its server within reach;
    offline (WANDB_MODE=offline) needs neither."""
    if kind != "wandb" or os.environ.get("WANDB_MODE", "").lower() in WANDB_OFFLINE:
        return None
    import netrc
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        with contextlib.suppress(OSError, netrc.NetrcParseError):  # no ~/.netrc, or an unreadable one
            key = (netrc.netrc().authenticators(host) or (None, None, None))[2]
    if not key:
        return f"wandb has no credentials for {host}: run `wandb login`, or set WANDB_MODE=offline (no network needed)"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as e:
        return f"cannot reach {host} ({e}); set WANDB_MODE=offline to log to the run folder instead"
    return None


@contextlib.contextmanager
def report_to(kind, out, start=0):
    """--report-to: yields report(line), which writes the numbers of a metrics.jsonl line at its step to TensorBoard
    (OUT/tensorboard) or W&B (OUT/wandb; WANDB_MODE=offline works with no network), the settings (OUT/config.json)
    once at the start; the run closed at the end. On --resume from step `start`, TensorBoard's later points (of the
    steps the checkpoint did not keep, as metrics.jsonl) are dropped; W&B starts a run of its own."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text())
    figures = lambda line: {k: v for k, v in line.items() if k != "step" and isinstance(v, numbers.Real)}
    if kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(out / "tensorboard", purge_step=start + 1 if start else None) as writer:
            writer.add_text("config", json.dumps(config, indent=2))

            def report(line):
                for name, value in figures(line).items():
                    writer.add_scalar(name, value, line["step"])
                writer.flush()  # readable while the run goes on
            yield report
    else:
        import wandb
        run = wandb.init(project="gdro", name=out.name, dir=out, config=config)
        try:
            yield lambda line: run.log(figures(line), step=line["step"])
        finally:
            run.finish()
