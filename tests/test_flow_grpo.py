"""The Flow-GRPO baseline (experiments/flow_grpo.py): its SDE step, its log-probability, its objective at init."""
import argparse
import contextlib
import json
import math

import pytest
import torch

import families
import gdro
from experiments import flow_grpo, toy_reward


def test_the_sde_steps_log_probability_is_the_gaussian_density_of_the_transition():
    gen = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(3))
    x_next, mean, std = flow_grpo.sde_step(x, v, 0.7, 0.6, 0.7, noise)
    std_t = 0.7 * math.sqrt(0.7 / 0.3)
    assert std == pytest.approx(std_t * math.sqrt(0.1))
    torch.testing.assert_close(x_next, mean + std * noise)
    direct = torch.distributions.Normal(mean, std).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(flow_grpo.log_prob(x_next, mean, std), direct)


def test_with_noise_level_zero_the_sde_step_is_the_euler_step():
    gen = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(2, 16, 12, generator=gen) for _ in range(3))
    x_next, mean, std = flow_grpo.sde_step(x, v, 0.5, 0.4, 0.0, noise)
    assert std == 0
    torch.testing.assert_close(x_next, x + v * (0.4 - 0.5))
    torch.testing.assert_close(mean, x_next)


def test_advantages_are_the_prompts_centred_rewards_over_the_batchs_std_clipped():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 100.0, 0.0])
    adv = flow_grpo.advantages(r, 2, 5.0)
    expected = (r - torch.tensor([0.5, 0.5, 0.5, 0.5, 50.0, 50.0])) / (r.std() + 1e-4)
    torch.testing.assert_close(adv, expected.clamp(-5, 5))


def tiny_policy():
    pipe = families.build_tiny_pipeline(gdro.family_record("sd3"))
    lora = argparse.Namespace(lora_rank=4, seed=0, grad_checkpointing=False, compile=False)
    gdro.add_lora(pipe.transformer, gdro.SD3.lora_targets, lora)
    return pipe


def test_at_lora_init_the_ratio_is_exactly_one_and_the_kl_exactly_zero():
    pipe, s = tiny_policy(), {**flow_grpo.FLOW_GRPO, "steps": 3}
    cond, uncond = (({k: v.expand(2, *v.shape[1:]) for k, v in c.items()})
                    for c in gdro.encode_prompt(pipe, gdro.family_record("sd3"), "red sky"))
    sig = flow_grpo.sigmas(dict(pipe.scheduler.config), s["steps"])
    gen = torch.Generator().manual_seed(0)
    x = flow_grpo.initial_noise(gdro.family_record("sd3"), pipe.transformer, 2, 32, gen)
    states, log_probs = flow_grpo.rollout(gdro.SD3().velocity, pipe.transformer, cond, uncond, x, sig, s, gen)
    for j in range(2):
        loss, ratio, kl = flow_grpo.policy_loss(gdro.SD3().velocity, pipe.transformer, states, log_probs,
                                                torch.tensor([1.0, -1.0]), cond, uncond, sig, j, s)
        assert torch.equal(ratio, torch.ones(2)), ratio
        assert torch.equal(kl, torch.zeros(2)), kl
        assert loss.requires_grad


def test_the_kl_is_flow_grpos_form_dt_times_the_gaussian_kl_of_the_two_transitions():
    pipe, s = tiny_policy(), {**flow_grpo.FLOW_GRPO, "steps": 3}
    with torch.no_grad():  # move the LoRA off its init, so that the policy and the reference differ
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    cond, uncond = ({k: v.expand(2, *v.shape[1:]) for k, v in c.items()}
                    for c in gdro.encode_prompt(pipe, gdro.family_record("sd3"), "red sky"))
    sig = flow_grpo.sigmas(dict(pipe.scheduler.config), s["steps"])
    gen, velocity = torch.Generator().manual_seed(0), gdro.SD3().velocity
    x = flow_grpo.initial_noise(gdro.family_record("sd3"), pipe.transformer, 2, 32, gen)
    states, log_probs = flow_grpo.rollout(velocity, pipe.transformer, cond, uncond, x, sig, s, gen)
    j = 1
    _, kl = flow_grpo.policy_loss(velocity, pipe.transformer, states, log_probs, torch.ones(2), cond, uncond, sig,
                                  j, s)[1:]
    with torch.no_grad():
        means = []
        for off in (False, True):
            with gdro.adapter_disabled(pipe.transformer) if off else contextlib.nullcontext():
                v = flow_grpo.guided_velocity(velocity, pipe.transformer, states[j], sig[j], cond, uncond,
                                              s["guidance"])
            means.append(flow_grpo.sde_step(states[j], v, sig[j], sig[j + 1], s["noise_level"], sigma_max=sig[1])[1:])
    (mean, std), (mean_ref, _) = means
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                              torch.distributions.Normal(mean_ref, std)).flatten(1).mean(1)
    assert kl.min() > 0
    torch.testing.assert_close(kl, (sig[j] - sig[j + 1]) * exact)


def test_the_cfg_training_gradient_is_guidance_times_the_conditional_branchs_as_flow_grpos_code():
    """Flow-GRPO's training detaches the unconditional prediction: the LoRA's gradient of the guided velocity is
    g d v_cond, not (1 - g) d v_uncond + g d v_cond (what it was before the detach)."""
    pipe, g = tiny_policy(), 4.5
    with torch.no_grad():  # LoRA B off zero: at init the LoRA's gradient through A is zero either way
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    cond, uncond = gdro.encode_prompt(pipe, gdro.family_record("sd3"), "red sky")
    gen, velocity = torch.Generator().manual_seed(0), gdro.SD3().velocity
    x = flow_grpo.initial_noise(gdro.family_record("sd3"), pipe.transformer, 1, 32, gen)
    weights = torch.randn(x.shape, generator=gen)  # a fixed direction: the gradient of <weights, v>
    lora = [p for p in pipe.transformer.parameters() if p.requires_grad]
    grad = lambda v: torch.autograd.grad((weights * v).sum(), lora)
    guided = grad(flow_grpo.guided_velocity(velocity, pipe.transformer, x, 0.7, cond, uncond, g))
    branch = lambda c: grad(velocity(pipe.transformer, x, torch.full((1,), 0.7), c))
    d_cond, d_uncond = branch(cond), branch(uncond)
    for a, c in zip(guided, d_cond):
        torch.testing.assert_close(a, g * c, rtol=1e-4, atol=1e-6)
    old = [(1 - g) * u + g * c for u, c in zip(d_uncond, d_cond)]  # without the detach
    assert max((a - o).abs().max().item() for a, o in zip(guided, old)) > 1e-3 * max(c.abs().max().item()
                                                                                      for c in d_cond)


def sde_colour_rewards(pipe, prompts, resolution, s, n=128, seed=1000):
    """[len(prompts) * n] colour rewards of the policy's own SDE samples (what Flow-GRPO optimises), drawn from the
    same n noises (initial and per step) whatever the weights: paired between the base and a LoRA."""
    rewards, sig = [], flow_grpo.sigmas(dict(pipe.scheduler.config), s["steps"])
    for p in prompts:
        rows = lambda c: {k: v.expand(n, *v.shape[1:]) for k, v in c.items()}  # one row per image
        cond, uncond = (rows(c) for c in gdro.encode_prompt(pipe, gdro.family_record("sd3"), p))
        gen = torch.Generator().manual_seed(seed)
        x = flow_grpo.initial_noise(gdro.family_record("sd3"), pipe.transformer, n, resolution, gen)
        states, _ = flow_grpo.rollout(gdro.SD3().velocity, pipe.transformer, cond, uncond, x, sig, s, gen)
        with torch.no_grad():
            rewards += toy_reward.colour_reward(gdro.decode(pipe, gdro.family_record("sd3"), states[-1]), [p] * n)
    return torch.tensor(rewards)


@pytest.mark.slow
def test_a_few_flow_grpo_steps_raise_a_toy_reward(tmp_path):
    """24 online steps (16 SDE rollouts each, 16 x 16 pixels) at a toy's learning rate raise the reward of the
    policy's SDE samples (what Flow-GRPO optimises) from 2 x 128 held-out noises, paired, by more than 3 standard
    errors. Measured over training seeds 0-7 on one machine: +0.058 to +0.255, 4.9 to 22.9 se (this test's seed 0:
    +0.168, 14.3 se). Fewer steps are not robust: after 16, two of the 8 seeds lose (-3.5 and -2.5 se), as a large
    Adam step on this random toy can undo what the last ones gained. The ODE samples' reward (Flow-GRPO's
    evaluation) rises too, on the same 8 seeds by +0.028 to +0.091, 3.4 to 13.9 se: too near 3 se to test on."""
    prompts, res, n = ["red sky", "red wall"], 16, 24
    settings = {"steps": 4, "train_steps": 3, "group_size": 8, "lr": 0.1, "lora_rank": 4}
    checkpoints = flow_grpo.train(None, prompts, toy_reward.colour_reward, tmp_path, settings, max_steps=n,
                                  tiny=True, family="sd3", resolution=res, save_every=n)
    pipe, full = families.build_tiny_pipeline(gdro.family_record("sd3")), {**flow_grpo.FLOW_GRPO, **settings}
    before = sde_colour_rewards(pipe, prompts, res, full)
    pipe.load_lora_weights(str(checkpoints / f"step_{n:06d}"))
    gain = sde_colour_rewards(pipe, prompts, res, full) - before
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["images_sampled"] for m in log] == [16 * (s + 1) for s in range(n)]
    assert gain.mean() > 3 * gain.std() / len(gain) ** 0.5, (gain.mean(), gain.std(), [m["reward"] for m in log])
