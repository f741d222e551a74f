"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470), the ONLINE baseline GDRO is compared with: a minimal, faithful
version on gdro.py's public functions (loading, prompt encoding, the velocity call, the reward, the LoRA).

Each step the CURRENT policy draws a group of images per prompt with Flow-GRPO's SDE sampler, keeping every
transition's Gaussian log-probability; the reward scores them; group-normalised advantages weight a PPO-style
clipped ratio objective over the denoising steps it trains on, plus a KL term to the reference (the same transformer
with the adapter off, as in GDRO). gdro.py never imports this file.

The SDE step (Flow-GRPO's sde_step_with_logprob), from sigma to the next sigma' (dt = sigma' - sigma < 0):
    std_t = a * sqrt(sigma / (1 - sigma))         (a: the noise level; at sigma = 1 the next sigma stands in below)
    mean  = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    x'    = mean + std_t sqrt(-dt) noise;  log p(x' | x) averaged over latent elements
With a = 0 it is the ODE's Euler step, which evaluation uses. The KL to the reference, as in Flow-GRPO's code:
    KL = mean over latent elements of (mean - mean_ref)^2 / (2 std_t^2)

    python -m experiments.flow_grpo --model runs/text_model --prompts PROMPTS --out runs/flow_grpo

Settings from Flow-GRPO's paper and code (FLOW_GRPO), scaled down only where named in the comparison.
"""
import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch

import experiments
import gdro

FLOW_GRPO = {  # Flow-GRPO's OCR settings as read in its public code (config/grpo.py, flow_grpo/diffusers_patch)
    "noise_level": 0.7,   # a in std_t = a sqrt(sigma / (1 - sigma))
    "steps": 10,          # SDE sampling steps per rollout
    "train_steps": 9,     # of which the first 9 transitions are trained on (timestep_fraction 0.99)
    "clip_range": 1e-4,   # PPO ratio clip
    "adv_clip_max": 5.0,  # advantages clipped at +-5
    "kl": 0.04,           # KL weight (OCR)
    "group_size": 24,     # images per prompt
    "prompts_per_step": 2,
    "minibatches": 2,     # optimizer steps per rollout batch: the later ones are off-policy, the clip matters
    "guidance": 4.5,      # CFG in sampling and training (SD3)
    "lr": 3e-4, "lora_rank": 32, "max_grad_norm": 1.0,
}
# What differs from Flow-GRPO's code, kept as it is so that every method of the comparison shares it: the LoRA's
# alpha equals its rank (gdro.add_lora; Flow-GRPO's alpha is 64 at rank 32), no EMA of the LoRA weights (its decay 0.9
# every 8 steps), AdamW's weight decay torch's 0.01 (its 1e-4), fp32 on a CPU (its bf16), 2 prompts a step (its 48
# groups over 32 GPUs). The same as its code: the SDE step and log-probability, the ratio clip, the KL's form, the
# advantages (each prompt's mean, the batch's std), the CFG training call with the unconditional half detached.


def sde_step(x, v, sigma, sigma_next, noise_level, noise=None, sigma_max=None):
    """One transition x (at sigma) -> x' (at sigma_next) of Flow-GRPO's SDE, given the velocity v at x.
    x, v: [N, ...]; sigma, sigma_next: floats (or 0-d tensors). noise: [N, ...] standard normal, or None to return the
    mean as x' (noise_level 0 gives the Euler step). sigma_max: the largest sigma below 1, used where sigma = 1.
    Returns (x_next, mean, std) with std = std_t sqrt(-dt) the transition's standard deviation."""
    dt = sigma_next - sigma
    denominator = 1 - (sigma_max if sigma == 1 and sigma_max is not None else sigma)
    std_t = noise_level * math.sqrt(sigma / denominator)
    mean = x * (1 + std_t ** 2 / (2 * sigma) * dt) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    x_next = mean if noise is None or std == 0 else mean + std * noise
    return x_next, mean, std


def log_prob(x_next, mean, std):
    """[N]: the Gaussian log-density of x_next under N(mean, std^2), averaged over latent elements (as Flow-GRPO)."""
    lp = -((x_next.detach() - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sigmas(scheduler_config, steps, mu=None):
    """The sampler's sigmas (steps + 1, ending at 0) on the model's shifted schedule, as its Euler scheduler sets."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, mu=mu) if scheduler.config.use_dynamic_shifting else scheduler.set_timesteps(steps)
    return scheduler.sigmas.tolist()


def guided_velocity(velocity, transformer, x, sigma, cond, uncond, guidance):
    """The velocity with CFG (SD3: cond and uncond in one batch), or the plain call for a model without uncond.
    The unconditional half is detached, as Flow-GRPO's training does (scripts/train_sd3.py): the LoRA's gradient is
    guidance times the conditional branch's, not (1 - guidance) d v_uncond + guidance d v_cond. The value is the same,
    so sampling and the reference (no gradient there) are unchanged."""
    t = torch.full((len(x),), float(sigma))
    if not uncond:
        return velocity(transformer, x, t, cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    v_uncond, v_cond = velocity(transformer, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    v_uncond = v_uncond.detach()
    return v_uncond + guidance * (v_cond - v_uncond)


def initial_noise(record, transformer, n, resolution, generator):
    """x at sigma = 1 in the transformer's layout (FLUX's packed tokens, or the VAE's grid); record: the family's."""
    side = resolution // 8
    channels = transformer.config.in_channels // (4 if record.packed else 1)
    z = torch.randn(n, channels, side, side, generator=generator)
    return record.pack(z) if record.packed else z


@torch.no_grad()
def rollout(velocity, transformer, cond, uncond, x, sig, s, gen):
    """The current policy's SDE trajectory from x: states [T+1] and each transition's log-probability [T] of [N]."""
    states, log_probs = [x], []
    for j in range(len(sig) - 1):
        v = guided_velocity(velocity, transformer, states[-1], sig[j], cond, uncond, s["guidance"])
        noise = torch.randn(x.shape, generator=gen)
        x_next, mean, std = sde_step(states[-1], v, sig[j], sig[j + 1], s["noise_level"], noise, sig[1])
        states.append(x_next)
        log_probs.append(log_prob(x_next, mean, std) if std > 0 else torch.zeros(len(x)))
    return states, log_probs


def advantages(rewards, group_size, clip):
    """(r - the prompt's mean) / (the batch's std + 1e-4), clipped at +-clip: rewards [P * group_size]."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    mean = r.view(-1, group_size).mean(1).repeat_interleave(group_size)
    return ((r - mean) / (r.std() + 1e-4)).clamp(-clip, clip)


def policy_loss(velocity, transformer, states, old_log_probs, adv, cond, uncond, sig, j, s):
    """Flow-GRPO's loss at transition j: the clipped ratio objective and the KL to the reference (adapter off).
    Returns (loss, ratio [N], kl [N])."""
    v = guided_velocity(velocity, transformer, states[j], sig[j], cond, uncond, s["guidance"])
    _, mean, std = sde_step(states[j], v, sig[j], sig[j + 1], s["noise_level"], sigma_max=sig[1])
    with torch.no_grad(), gdro.adapter_disabled(transformer):
        v_ref = guided_velocity(velocity, transformer, states[j], sig[j], cond, uncond, s["guidance"])
        _, mean_ref, _ = sde_step(states[j], v_ref, sig[j], sig[j + 1], s["noise_level"], sigma_max=sig[1])
    ratio = torch.exp(log_prob(states[j + 1], mean, std) - old_log_probs[j])
    clipped = ratio.clamp(1 - s["clip_range"], 1 + s["clip_range"])
    pg = torch.maximum(-adv * ratio, -adv * clipped).mean()
    # Flow-GRPO's KL divides by std_t^2, not by the transition's variance std_t^2 |dt|: it is |dt| times the exact
    # KL of the two Gaussian transitions; its weight 0.04 is set for this form
    std_t = std / math.sqrt(sig[j] - sig[j + 1])
    kl = (mean - mean_ref).pow(2).flatten(1).mean(1) / (2 * std_t ** 2)
    return pg + s["kl"] * kl.mean(), ratio.detach(), kl.detach()


def train(model, prompts, reward_fn, out, settings, max_steps, tiny=False, family=None, resolution=None, seed=0,
          save_every=10, max_cpu_seconds=math.inf):
    """Flow-GRPO on `prompts` for max_steps steps, or until a step ends with the process past max_cpu_seconds of CPU
    time since it started; a LoRA checkpoint every save_every steps (and the last) in OUT/checkpoints, with the
    compute so far (images sampled, CPU seconds of the process from its start, wall seconds of the loop) in
    OUT/metrics.jsonl."""
    s, out = {**FLOW_GRPO, **settings}, Path(out)
    G = s["group_size"]
    # the family and the model's own resolution as gdro.py settles them
    model_args = gdro.settle_model(argparse.Namespace(model=str(model), tiny=tiny, family=family, guidance=None,
                                                      resolution=resolution))
    pipe, record = gdro.load_pipeline(model, tiny, model_args.family)
    transformer, resolution = pipe.transformer, model_args.resolution
    velocity = record.velocity  # a guidance-distilled model (FLUX.1) takes its guidance in the call, no CFG
    if getattr(transformer.config, "guidance_embeds", False):
        velocity = functools.partial(record.velocity, guidance=s["guidance"])
    lora = argparse.Namespace(lora_rank=s["lora_rank"], seed=seed, grad_checkpointing=False, compile=False)
    params = gdro.add_lora(transformer, record.lora_targets, lora)
    optimizer = torch.optim.AdamW(params, lr=s["lr"])
    rows = lambda c: {k: v.expand(G, *v.shape[1:]) for k, v in c.items()}  # one row per image of a group
    encoded = [[rows(c) for c in gdro.encode_prompt(pipe, record, p)] for p in prompts]
    config, latent_shape = dict(pipe.scheduler.config), initial_noise(record, transformer, 1, resolution, None).shape
    sig = sigmas(config, s["steps"], gdro.schedule_mu(record, config, latent_shape[1:], s["steps"]))
    cat = lambda dicts: {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}
    out.mkdir(parents=True, exist_ok=True)
    t0, images = time.time(), 0
    timed = math.isfinite(max_cpu_seconds)  # a CPU budget: the bar counts its seconds
    bar = gdro.progress(None, "Flow-GRPO", "CPU s" if timed else "step",
                        total=round(max_cpu_seconds) if timed else max_steps)
    for step in range(max_steps):
        chosen = torch.randperm(len(prompts), generator=gdro.keyed_generator(seed, "prompts", step))
        chosen = chosen[:s["prompts_per_step"]].tolist()
        trajectories, rewards = [], []  # per prompt: (states, log_probs) of its G images, their rewards
        for i in chosen:
            gen = gdro.keyed_generator(seed, "rollout", step, i)
            x = initial_noise(record, transformer, G, resolution, gen)
            trajectories.append(rollout(velocity, transformer, *encoded[i], x, sig, s, gen))
            with torch.no_grad():
                pil = gdro.decode(pipe, record, trajectories[-1][0][-1])
            rewards += [float(r) for r in reward_fn(pil, [prompts[i]] * G)]
        images += len(rewards)
        adv = advantages(rewards, G, s["adv_clip_max"])
        # the step's rollouts as one batch of N = len(rewards) images: states [T+1] and log-probs [T] of [N, ...]
        states = [torch.cat(x) for x in zip(*(t[0] for t in trajectories))]
        old_log_probs = [torch.cat(x) for x in zip(*(t[1] for t in trajectories))]
        cond, uncond = (cat([encoded[i][c] for i in chosen]) if encoded[chosen[0]][c] else {} for c in (0, 1))
        # split into minibatches (each image once), an optimizer step after each: the later ones are off-policy
        order = torch.randperm(len(rewards), generator=gdro.keyed_generator(seed, "minibatch", step))
        stats = []
        for mine in order.chunk(s["minibatches"]):
            pick = lambda d: {k: v[mine] for k, v in d.items()}
            st, lp = [x[mine] for x in states], [x[mine] for x in old_log_probs]
            for j in range(s["train_steps"]):
                loss, ratio, kl = policy_loss(velocity, transformer, st, lp, adv[mine], pick(cond), pick(uncond),
                                              sig, j, s)
                (loss / s["train_steps"]).backward()
                clipped = ((ratio - 1).abs() > s["clip_range"]).float().mean()  # images the clip holds
                stats.append((loss.item(), ratio.mean().item(), kl.mean().item(), clipped.item()))
            torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss, ratio, kl, clipfrac = (sum(x) / len(stats) for x in zip(*stats))
        line = {"step": step + 1, "reward": sum(rewards) / len(rewards), "loss": loss, "ratio": ratio, "kl": kl,
                "clipfrac": clipfrac,
                "images_sampled": images, "seconds": round(time.time() - t0, 2),
                "cpu_seconds": round(time.process_time(), 2)}  # from the process's start: loading and all
        gdro.append_line(out / "metrics.jsonl", json.dumps(line))
        bar.update(min(round(line["cpu_seconds"]), bar.total) - bar.n if timed else 1)
        last = step + 1 == max_steps or line["cpu_seconds"] >= max_cpu_seconds
        if (step + 1) % save_every == 0 or last:
            gdro.save_lora(type(pipe), transformer, out / "checkpoints" / f"step_{step + 1:06d}")
        if last:
            break
    bar.close()
    return out / "checkpoints"


# What each FLOW_GRPO value may be (--set); train_steps, prompts_per_step and minibatches are also held to the
# run's other values in main
SETTING_RULES = {"noise_level": experiments.POSITIVE, "steps": experiments.AT_LEAST_1,
                 "train_steps": experiments.AT_LEAST_1, "clip_range": experiments.POSITIVE,
                 "adv_clip_max": experiments.POSITIVE, "kl": experiments.FINITE_AT_LEAST_0,
                 "group_size": experiments.AT_LEAST_2, "prompts_per_step": experiments.AT_LEAST_1,
                 "minibatches": experiments.AT_LEAST_1, "guidance": experiments.FINITE_AT_LEAST_0,
                 "lr": experiments.POSITIVE, "lora_rank": experiments.AT_LEAST_1,
                 "max_grad_norm": experiments.POSITIVE}


def check_model(model):
    """--model: a diffusers folder, or a hub id; a local path that is neither is refused before anything loads."""
    folder = Path(model)
    if folder.is_dir() and not (folder / "model_index.json").is_file():
        raise gdro.BadInput(f"--model {model}: a folder without model_index.json; expected a pipeline saved with "
                            "save_pretrained, or a hub id")
    if not folder.exists() and folder.parent != Path(".") and folder.parent.is_dir():
        raise gdro.BadInput(f"--model {model}: no such folder ({folder.parent} holds none of that name)")


def main(argv=None):
    p = experiments.Parser(description="Flow-GRPO (online, SDE rollouts): the baseline GDRO is compared with.")
    p.add_argument("--model", required=True, help="hub id or local folder of a pipeline")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--reward", default="ocr", help="'ocr' or FILE.py:FUNCTION, as gdro.py's")
    p.add_argument("--out", default="runs/flow_grpo", help="output folder, for one run (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=100, help="steps of rollouts + updates (default: %(default)s)")
    p.add_argument("--max-cpu-seconds", type=float, default=math.inf,
                   help="or stop after the step that takes the process's CPU time since it started past this")
    p.add_argument("--save-every", type=int, default=10, help="steps between LoRA checkpoints (default: %(default)s)")
    p.add_argument("--resolution", type=int, help="image side (default: 512, or the model's if smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rollouts and draws (default: %(default)s)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change a FLOW_GRPO value")
    args = p.parse_args(argv)
    factor = gdro.RESOLUTION_FACTOR
    experiments.check(("--max-steps", args.max_steps, experiments.AT_LEAST_1),
                      ("--max-cpu-seconds", args.max_cpu_seconds, (lambda x: x > 0, "> 0")),
                      ("--save-every", args.save_every, experiments.AT_LEAST_1),
                      ("--seed", args.seed, experiments.AT_LEAST_0),
                      ("--resolution", args.resolution, (lambda x: x is None or x >= factor and x % factor == 0,
                                                         f"a positive multiple of {factor}")))
    settings = experiments.key_values("--set", args.set, FLOW_GRPO, SETTING_RULES)
    s = {**FLOW_GRPO, **settings}
    experiments.check_out(args.out)
    if (Path(args.out) / "metrics.jsonl").exists():  # a second run would append to the first's log
        raise gdro.BadInput(f"--out {args.out} holds a run already (metrics.jsonl); use another --out, or delete it")
    check_model(args.model)
    prompts = gdro.read_prompts(args.prompts, args.reward)
    images = s["group_size"] * min(s["prompts_per_step"], len(prompts))
    at_most = experiments.at_most
    experiments.check(("--set train_steps=", s["train_steps"], at_most(s["steps"], "the steps")),
                      ("--set prompts_per_step=", s["prompts_per_step"], at_most(len(prompts), "the prompts")),
                      ("--set minibatches=", s["minibatches"], at_most(images, "the images a step samples")))
    reward_fn = gdro.load_reward(args.reward)
    train(args.model, prompts, reward_fn, args.out, settings, args.max_steps, resolution=args.resolution,
          seed=args.seed, save_every=args.save_every, max_cpu_seconds=args.max_cpu_seconds)


if __name__ == "__main__":
    gdro.cli(main)
