"""The specification of GDRO as tests: the loss (Eqs. 5-9), the offline cache, the trainer, both model families.

Run: pytest -q
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gdro
from gdro import gdro_loss

FAMILIES = ["sd3", "flux"]

# ----------------------------------------------------------------------------- the loss


def test_loss_matches_hand_computed_plackett_luce_case():
    err_policy = torch.tensor([[0.5, 0.2, 0.9]])
    err_ref = torch.tensor([[0.4, 0.4, 0.4]])
    rewards = torch.tensor([[0.3, 0.9, 0.1]])
    # by hand: sorted best -> worst the images are (1, 0, 2); s = -beta (err_policy - err_ref), beta = 1
    s = [0.2, -0.1, -0.5]
    r = [0.9, 0.3, 0.1]
    tau, gamma = 1.0, 0.5

    def position_term(i):  # logsumexp of the remaining s minus the q_i-weighted s, Eq. 7
        lse = math.log(sum(math.exp(x) for x in s[i:]))
        w = [math.exp(x / tau) for x in r[i:]]
        return lse - sum(wj / sum(w) * sj for wj, sj in zip(w, s[i:]))

    expected = position_term(0) + position_term(1) + gamma * 0.2  # + gamma * err_policy of the best image
    got = gdro_loss(err_policy, err_ref, rewards, beta=1.0, tau=tau, gamma=gamma)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_pairwise_hard_ranking_without_stabiliser_is_diffusion_dpo():
    torch.manual_seed(0)
    err_policy, err_ref = torch.rand(5, 2), torch.rand(5, 2)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.9, 0.1], [0.2, 0.6]])
    beta = 12.0
    w = rewards.argmax(1, keepdim=True)  # winner and loser of each pair
    s = -beta * (err_policy - err_ref)
    dpo = -torch.nn.functional.logsigmoid(s.gather(1, w) - s.gather(1, 1 - w)).mean()
    assert gdro_loss(err_policy, err_ref, rewards, beta=beta, tau=0.0, gamma=0.0).item() == pytest.approx(dpo.item(), rel=1e-5)
    # and tau -> 0 is the limit of the soft loss (Eq. 12 from Eq. 7)
    assert gdro_loss(err_policy, err_ref, rewards, beta=beta, tau=1e-4, gamma=0.0).item() == pytest.approx(dpo.item(), rel=1e-3)


def test_constant_shift_of_a_groups_reference_errors_changes_nothing():
    torch.manual_seed(1)
    err_policy, err_ref, rewards = torch.rand(3, 6), torch.rand(3, 6), torch.rand(3, 6)
    shifted = err_ref + torch.tensor([[0.7], [-2.0], [5.0]])  # one constant per group
    for tau in (0.0, 0.05, 1.0):
        a = gdro_loss(err_policy, err_ref, rewards, tau=tau)
        b = gdro_loss(err_policy, shifted, rewards, tau=tau)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)


def test_image_order_within_a_group_does_not_matter():
    torch.manual_seed(2)
    err_policy, err_ref, rewards = torch.rand(4, 6), torch.rand(4, 6), torch.rand(4, 6)
    perm = torch.randperm(6)
    a = gdro_loss(err_policy, err_ref, rewards)
    b = gdro_loss(err_policy[:, perm], err_ref[:, perm], rewards[:, perm])
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_reference_errors_receive_no_gradient():
    err_ref = torch.rand(2, 6, requires_grad=True)
    gdro_loss(torch.rand(2, 6, requires_grad=True), err_ref, torch.rand(2, 6)).backward()
    assert err_ref.grad is None


@pytest.mark.parametrize("tau", [0.0, 0.05])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_a_gradient_step_lowers_the_best_images_error_relative_to_the_worst(tau, gamma):
    rewards = torch.tensor([[0.2, 0.9, 0.5, 0.1, 0.7, 0.4]])
    best, worst = rewards.argmax(), rewards.argmin()
    err_ref = torch.full((1, 6), 0.5)
    err_policy = torch.full((1, 6), 0.5, requires_grad=True)  # policy == reference, as at the start of training
    gdro_loss(err_policy, err_ref, rewards, tau=tau, gamma=gamma).backward()
    stepped = err_policy.detach() - 1e-3 * err_policy.grad
    assert stepped[0, best] - stepped[0, worst] < 0
    assert (stepped[0] - 0.5).argmin() == best  # and the best image gains most


def test_stabiliser_is_the_best_images_flow_matching_error():
    err_policy, err_ref = torch.rand(3, 4), torch.rand(3, 4)
    rewards = torch.rand(3, 4)
    diff = gdro_loss(err_policy, err_ref, rewards, gamma=2.0) - gdro_loss(err_policy, err_ref, rewards, gamma=0.0)
    best_err = err_policy.gather(1, rewards.argmax(1, keepdim=True)).mean()
    assert diff.item() == pytest.approx(2.0 * best_err.item(), rel=1e-5)


def test_training_noise_levels_follow_the_schedulers_shift():
    gen = torch.Generator().manual_seed(0)
    t = gdro.sample_t(20000, {"shift": 3.0}, None, gen)  # SD3: logit-normal median 0.5 -> 3*0.5/(1+2*0.5)
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    flux = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
            "base_image_seq_len": 256, "max_image_seq_len": 4096}
    t_small, t_large = (gdro.sample_t(20000, flux, n, gen).median().item() for n in (256, 4096))
    assert t_small == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1), abs=0.01)  # FLUX: more noise at high res
    assert t_large == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=0.01)


# ----------------------------------------------------------------------------- the pipeline, both families


@pytest.mark.parametrize("family", FAMILIES)
def test_training_velocity_is_the_velocity_the_sampler_follows(family):
    # one Euler step from t = 1 to t = 0 is x_0 = x_1 - v(x_1, 1): the pipeline's v must be gdro.velocity's
    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    cond, uncond = gdro.encode_prompt(pipe, fam, 'a shop sign that reads "Open"')
    seen = {}

    def keep_first_input(module, args, kwargs):
        seen.setdefault("x1", kwargs["hidden_states"])

    pipe.transformer.register_forward_pre_hook(keep_first_input, with_kwargs=True)
    guidance = 1.0 if fam == "sd3" else 3.5  # SD3 without CFG, so the step is one transformer call
    x0 = gdro.generate(pipe, cond, uncond, [11], 1, guidance, 64)
    with torch.no_grad():
        v = gdro.velocity(pipe.transformer, fam, seen["x1"], torch.ones(1), cond, guidance)
    torch.testing.assert_close(x0, seen["x1"] - v, rtol=1e-4, atol=1e-4)

BRIGHTNESS = '''
import numpy as np
def brightness(images, prompts):
    return [float(np.asarray(im, dtype=np.float32).mean() / 255) for im in images]
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gdro")
    (d / "prompts.txt").write_text('a shop sign that reads "Open Late"\n\na mug printed with "Coffee 42"\n'
                                   'a neon sign saying "Bar"\na cake with "Happy Birthday Ana"\n')
    (d / "reward.py").write_text(BRIGHTNESS)
    return d


def run(workdir, out, *flags, reward=None):
    reward = reward or f"{workdir / 'reward.py'}:brightness"
    return gdro.main(["--prompts", str(workdir / "prompts.txt"), "--tiny", "--out", str(out), "--reward", reward,
                      *flags])


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_end_to_end_lora_loads_into_a_fresh_pipeline_and_changes_it(workdir, family):
    out = workdir / f"e2e_{family}"
    lora_dir = run(workdir, out, "--family", family, reward="ocr" if family == "sd3" else None)
    assert (lora_dir / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["family"] == family
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [5, 10, 15, 20] and all(math.isfinite(l["loss"]) for l in lines)

    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    cond, uncond = gdro.encode_prompt(pipe, fam, 'a sign that reads "Hi"')
    before = gdro.generate(pipe, cond, uncond, [123], 4, gdro.DEFAULT_GUIDANCE[fam], 64)
    pipe.load_lora_weights(str(lora_dir))
    after = gdro.generate(pipe, cond, uncond, [123], 4, gdro.DEFAULT_GUIDANCE[fam], 64)
    assert not torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_holds_what_training_needs_and_the_text_encoders_are_not_needed(workdir, family):
    out = workdir / f"e2e_{family}"  # made by the end-to-end test above
    if not out.exists():
        run(workdir, out, "--family", family)
    shard = load_file(out / "cache" / "prompt_000000.safetensors")
    assert shard["x0"].shape[0] == shard["rewards"].shape[0] == shard["seeds"].shape[0] == 8
    assert {"prompt_embeds", "pooled_prompt_embeds"} <= set(shard)
    assert shard["seeds"].unique().numel() == 8
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["family"] == family and manifest["resolution"] == 64


@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_cache_build_equals_an_uninterrupted_one(workdir, tmp_path, family):
    args = gdro.parse_args(["--prompts", "x", "--tiny", "--images-per-prompt", "4", "--rollout-batch", "3"])
    args.guidance = gdro.DEFAULT_GUIDANCE[family]
    prompts = gdro.read_prompts(workdir / "prompts.txt", "ocr", 3)
    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    calls = []

    def reward(images, prompts_):
        calls.append(prompts_[0])
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return [float(np.asarray(im).mean()) for im in images]

    interrupt = False
    gdro.build_cache(pipe, fam, prompts, reward, tmp_path / "a", args)
    interrupt, calls = True, []
    with pytest.raises(KeyboardInterrupt):
        gdro.build_cache(pipe, fam, prompts, reward, tmp_path / "b", args)
    interrupt, calls = False, []
    gdro.build_cache(pipe, fam, prompts, reward, tmp_path / "b", args)
    assert calls == prompts[1:]  # the finished shard was not regenerated
    a, b = gdro.load_cache(tmp_path / "a", prompts), gdro.load_cache(tmp_path / "b", prompts)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_resumed_training_equals_uninterrupted_training(workdir):
    straight = run(workdir, workdir / "straight", "--max-steps", "10", "--save-every", "5")
    run(workdir, workdir / "resumed", "--max-steps", "5", "--save-every", "5")
    resumed = run(workdir, workdir / "resumed", "--max-steps", "10", "--save-every", "5", "--resume")
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    steps = [json.loads(l)["step"] for l in (workdir / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]


def test_interrupted_training_keeps_a_checkpoint_to_resume_from(workdir, monkeypatch):
    calls = []
    real_loss = gdro.gdro_loss

    def loss_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_loss(*a, **kw)

    monkeypatch.setattr(gdro, "gdro_loss", loss_then_interrupt)
    with pytest.raises(SystemExit, match="interrupted"):
        run(workdir, workdir / "interrupted", "--save-every", "100")
    state = torch.load(workdir / "interrupted" / "checkpoints" / "step_000007" / "state.pt", weights_only=True)
    assert state["step"] == 7


def test_non_finite_loss_stops_with_the_step_and_the_last_good_checkpoint(workdir, monkeypatch):
    real_loss, calls = gdro.gdro_loss, []

    def loss_that_diverges_at_step_3(*a, **kw):
        calls.append(1)
        return real_loss(*a, **kw) * (float("nan") if len(calls) == 4 else 1.0)

    monkeypatch.setattr(gdro, "gdro_loss", loss_that_diverges_at_step_3)
    with pytest.raises(SystemExit, match=r"non-finite loss at step 3.*step_000002"):
        run(workdir, workdir / "diverge", "--save-every", "2")
    assert not (workdir / "diverge" / "checkpoints" / "step_000004").exists()


# ----------------------------------------------------------------------------- bad input: one line, before heavy work


def test_missing_or_empty_prompt_file_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        gdro.main(["--prompts", str(tmp_path / "nope.txt"), "--tiny"])
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match="no prompts"):
        gdro.main(["--prompts", str(tmp_path / "empty.txt"), "--tiny"])


def test_prompts_without_quoted_text_are_named_by_line_for_the_ocr_reward(tmp_path):
    (tmp_path / "p.txt").write_text('a sign "Hi"\na sign with no quotes\n\nanother bare one\n')
    with pytest.raises(SystemExit, match=r"line\(s\) 2, 4 have no quoted text"):
        gdro.main(["--prompts", str(tmp_path / "p.txt"), "--tiny", "--out", str(tmp_path / "o")])


def test_an_existing_run_is_not_overwritten_without_resume(workdir):
    out = workdir / "e2e_flux"
    if not out.exists():
        run(workdir, out, "--family", "flux")
    with pytest.raises(SystemExit, match="--resume"):
        run(workdir, out, "--family", "flux")


def test_a_cache_made_another_way_is_refused(workdir):
    out = workdir / "e2e_flux"
    if not out.exists():
        run(workdir, out, "--family", "flux")
    with pytest.raises(SystemExit, match="resolution=64"):
        run(workdir, out, "--family", "flux", "--resolution", "32", "--resume")
    with pytest.raises(SystemExit, match="family='flux'"):
        run(workdir, out, "--family", "sd3", "--resume")


def test_a_bad_custom_reward_is_a_one_line_error(workdir, tmp_path):
    with pytest.raises(SystemExit, match="no function 'nope'"):
        run(workdir, tmp_path / "o", reward=f"{workdir / 'reward.py'}:nope")
    (tmp_path / "nan.py").write_text("def f(images, prompts):\n    return [float('nan')] * len(images)\n")
    with pytest.raises(SystemExit, match="finite"):
        run(workdir, tmp_path / "o2", reward=f"{tmp_path / 'nan.py'}:f")


def test_tiny_flags_given_explicitly_win_over_the_tiny_defaults():
    args = gdro.parse_args(["--prompts", "p", "--tiny", "--resolution", "32", "--max-steps=7"])
    assert args.resolution == 32 and args.max_steps == 7 and args.images_per_prompt == gdro.TINY_RUN["images_per_prompt"]
    assert gdro.parse_args(["--prompts", "p"]).beta == 12.0  # paper defaults without --tiny


def test_tiny_pipeline_is_reproducible_from_its_seed():
    a, b = gdro.build_tiny_pipeline("flux", seed=3), gdro.build_tiny_pipeline("flux", seed=3)
    for (name, p), q in zip(a.transformer.named_parameters(), b.transformer.parameters()):
        assert torch.equal(p, q), name
