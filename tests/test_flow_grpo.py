"""The Flow-GRPO baseline (experiments/flow_grpo.py): its SDE step, its log-probability, its objective at init."""
import argparse
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
                    for c in gdro.encode_prompt(pipe, "sd3", "red sky"))
    sig = flow_grpo.sigmas(dict(pipe.scheduler.config), s["steps"])
    gen = torch.Generator().manual_seed(0)
    x = flow_grpo.initial_noise("sd3", pipe.transformer, 2, 32, gen)
    states, log_probs = flow_grpo.rollout(gdro.SD3().velocity, pipe.transformer, cond, uncond, x, sig, s, gen)
    for j in range(2):
        loss, ratio, kl = flow_grpo.policy_loss(gdro.SD3().velocity, pipe.transformer, states, log_probs,
                                                torch.tensor([1.0, -1.0]), cond, uncond, sig, j, s)
        assert torch.equal(ratio, torch.ones(2)), ratio
        assert torch.equal(kl, torch.zeros(2)), kl
        assert loss.requires_grad


def colour_rewards(pipe, prompts, seeds, resolution, steps):
    """[len(prompts) * len(seeds)] colour rewards of the pipeline's ODE (Euler) samples: Flow-GRPO evaluates with
    noise 0."""
    rewards = []
    for p in prompts:
        cond, uncond = gdro.encode_prompt(pipe, "sd3", p)
        x0 = gdro.generate(pipe, cond, uncond, seeds, steps, gdro.SD3.guidance, resolution)
        rewards += toy_reward.colour_reward(gdro.decode(pipe, "sd3", x0), [p] * len(seeds))
    return torch.tensor(rewards)


def test_a_few_flow_grpo_steps_raise_a_toy_reward(tmp_path):
    """12 online steps (16 SDE rollouts each) at a toy's learning rate raise the held-out seeds' reward, paired, by
    more than 3 standard errors (measured: +0.089 +- 0.011, the base's seed-to-seed sd 0.082). Not robust yet: on
    another machine of the same kind the same test read +0.004 +- 0.008 and fails, and other training seeds range
    -0.015 to +0.039 at 12 steps."""
    prompts, seeds, res, n = ["red sky", "red wall"], list(range(1000, 1016)), 32, 12
    settings = {"steps": 4, "train_steps": 3, "group_size": 8, "lr": 0.1, "lora_rank": 4}
    checkpoints = flow_grpo.train(None, prompts, toy_reward.colour_reward, tmp_path, settings, max_steps=n,
                                  tiny=True, family="sd3", resolution=res, save_every=n)
    pipe = families.build_tiny_pipeline(gdro.family_record("sd3"))
    before = colour_rewards(pipe, prompts, seeds, res, settings["steps"])
    pipe.load_lora_weights(str(checkpoints / f"step_{n:06d}"))
    gain = colour_rewards(pipe, prompts, seeds, res, settings["steps"]) - before
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["images_sampled"] for m in log] == [16 * (s + 1) for s in range(n)]
    assert gain.mean() > 3 * gain.std() / len(gain) ** 0.5, (gain.mean(), gain.std(), [m["reward"] for m in log])
