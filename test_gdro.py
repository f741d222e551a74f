"""The specification of GDRO as tests: the loss (Eqs. 5-9), the inputs of the loss, how training draws its groups,
and the whole pipeline on both model families.

    pytest -q -m "not slow" test_gdro.py     # the specification: seconds
    pytest -q test_gdro.py                   # plus end-to-end runs on tiny models
"""
import contextlib
import functools
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

import families
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
    hard = gdro_loss(err_policy, err_ref, rewards, beta=beta, tau=0.0, gamma=0.0)
    assert hard.item() == pytest.approx(dpo.item(), rel=1e-5)
    # and tau -> 0 is the limit of the soft loss (Eq. 12 from Eq. 7)
    soft = gdro_loss(err_policy, err_ref, rewards, beta=beta, tau=1e-4, gamma=0.0)
    assert soft.item() == pytest.approx(dpo.item(), rel=1e-3)


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

# ----------------------------------------------------------------------------- the loss's inputs


def test_training_noise_levels_follow_the_schedulers_shift():
    gen = torch.Generator().manual_seed(0)
    sd3 = gdro.schedule_mu(gdro.family_record("sd3"), gdro.SD3.scheduler, (16, 16, 16), None)  # shift 3: mu = log 3
    t = gdro.sample_t(20000, sd3, gen)  # logit-normal median 0.5 -> 3*0.5/(1+2*0.5)
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.75, abs=0.01)
    flux = gdro.Flux.scheduler
    mu = lambda n: gdro.schedule_mu(gdro.family_record("flux"), flux, (n, 64), None)
    t_small, t_large = (gdro.sample_t(20000, mu(n), gen).median().item()
                        for n in (256, 4096))  # packed latents of n tokens
    assert t_small == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1), abs=0.01)  # FLUX: more noise at high res
    assert t_large == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=0.01)


def velocity_errors(transformer, family, x0, cond, t, eps, guidance=3.5):
    """gdro.velocity_errors with the family's velocity call (FLUX.1's distilled guidance; SD3 takes none)."""
    return gdro.velocity_errors(functools.partial(gdro.family_record(family).velocity, guidance=guidance), transformer,
                                x0, cond, t, eps)


def tiny_transformer_with_lora(family):
    transformer = families.build_tiny_pipeline(gdro.family_record(family)).transformer
    transformer.requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=gdro.family_record(family).lora_targets))
    return transformer


def random_groups(family, B=2, k=6):
    """B groups of k random 'cached latents' of the tiny models' shapes (64 px), with their conditioning."""
    g = torch.Generator().manual_seed(3)
    x_shape = (64, 64) if family == "flux" else (16, 16, 16)  # FLUX: 8 x 8 packed patches of 2 x 2 x 16 channels
    cond = {"prompt_embeds": torch.randn(B, 7, 64, generator=g),
            "pooled_prompt_embeds": torch.randn(B, 32 if family == "flux" else 64, generator=g)}
    x0, t = torch.randn(B, k, *x_shape, generator=g), torch.rand(B, generator=g)
    return x0, cond, t, torch.randn(B, *x_shape, generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_equals_reference_at_lora_init_so_the_ranking_term_is_exactly_log_uniform(family):
    transformer = tiny_transformer_with_lora(family)
    x0, cond, t, eps = random_groups(family)
    err_policy, err_ref = velocity_errors(transformer, family, x0, cond, t, eps)
    assert err_policy.shape == err_ref.shape == (2, 6) and err_policy.dtype == torch.float32
    assert torch.equal(err_policy, err_ref)
    # s = 0 for every image: position i's term is log(number of remaining items), so L_GDRO = log(k!)
    loss = gdro_loss(err_policy, err_ref, torch.rand(2, 6), gamma=0.0)
    assert loss.item() == pytest.approx(math.log(math.factorial(6)), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_errors_score_each_image_at_its_groups_one_t_and_one_eps(family):
    transformer = tiny_transformer_with_lora(family)
    x0, cond, t, eps = random_groups(family)
    err_policy, _ = velocity_errors(transformer, family, x0, cond, t, eps)
    b, j = 1, 4  # image 4 of group 1, by the definitions: x_t = (1 - t) x0 + t eps, v = eps - x0
    x_t = (1 - t[b]) * x0[b, j] + t[b] * eps[b]
    with torch.no_grad():
        one = {k: c[b:b + 1] for k, c in cond.items()}
        v_model = gdro.family_record(family).velocity(transformer, x_t[None], t[b:b + 1], one, 3.5)
    expected = (v_model[0] - (eps[b] - x0[b, j])).pow(2).mean()
    assert err_policy[b, j].item() == pytest.approx(expected.item(), rel=1e-5)


def test_training_velocity_is_the_velocity_the_sampler_follows():
    # one Euler step from t = 1 to t = 0 is x_0 = x_1 - v(x_1, 1): the pipeline's v must be gdro.velocity's
    for family in FAMILIES:
        pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
        cond, uncond = gdro.encode_prompt(pipe, fam, 'a shop sign that reads "Open"')
        seen = {}

        def keep_first_input(module, args, kwargs):
            seen.setdefault("x1", kwargs["hidden_states"])

        pipe.transformer.register_forward_pre_hook(keep_first_input, with_kwargs=True)
        guidance = 1.0 if fam.name == "sd3" else 3.5  # SD3 without CFG, so the step is one transformer call
        x0 = gdro.generate(pipe, fam, cond, uncond, [11], 1, guidance, 64)
        with torch.no_grad():
            v = fam.velocity(pipe.transformer, seen["x1"], torch.ones(1), cond, guidance)
        torch.testing.assert_close(x0, seen["x1"] - v, rtol=1e-4, atol=1e-4)

def method_block():
    """Section 2 of gdro.py, "the method", as source: what a reader copies into their own trainer."""
    source = Path(gdro.__file__).read_text()
    banner = "# " + "=" * 77
    return source[source.index(banner + " 2. the method"):source.index(banner + " 3. models")]


def test_the_method_block_runs_on_its_own_and_gives_gdros_loss_and_errors():
    namespace = {}
    exec("import contextlib\nimport math\n\nimport torch\n" + method_block(), namespace)  # nothing else of gdro.py
    assert {"sample_t", "velocity_errors", "gdro_loss"} <= namespace.keys()
    g = torch.Generator().manual_seed(5)
    err_policy, err_ref, rewards = (torch.rand(3, 6, generator=g) for _ in range(3))
    assert namespace["gdro_loss"](err_policy, err_ref, rewards).item() == gdro_loss(err_policy, err_ref, rewards).item()
    assert torch.equal(namespace["sample_t"](4, 1.1, torch.Generator().manual_seed(0)),
                       gdro.sample_t(4, 1.1, torch.Generator().manual_seed(0)))
    transformer = tiny_transformer_with_lora("sd3")
    x0, cond, t, eps = random_groups("sd3")
    ours = namespace["velocity_errors"](gdro.SD3().velocity, transformer, x0, cond, t, eps)
    for a, b in zip(ours, velocity_errors(transformer, "sd3", x0, cond, t, eps)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

# ----------------------------------------------------------------------------- how training draws its groups


def fake_cache(tmp_path, family="sd3", prompts=5, n=8, seed=0):
    """A cache of random latents of the tiny model's shapes: what training reads, without a rollout."""
    g = torch.Generator().manual_seed(seed)
    x_shape = (64, 64) if family == "flux" else (16, 16, 16)
    for i in range(prompts):
        gdro.write_shard(tmp_path, i, f"prompt {i}", {
            "x0": torch.randn(n, *x_shape, generator=g), "rewards": torch.rand(n, generator=g),
            "prompt_embeds": torch.randn(7, 64, generator=g),
            "pooled_prompt_embeds": torch.randn(32 if family == "flux" else 64, generator=g)})
    return tmp_path, [f"prompt {i}" for i in range(prompts)]


def train_args(tmp_path, *flags):
    return gdro.parse_args(["--tiny", "--prompts", "unused", "--out", str(tmp_path), "--save-every", "1000",
                            "--grad-checkpointing", *flags])


def test_every_prompt_is_trained_once_before_any_prompt_twice():
    P = 7
    visits = [gdro.epoch_order(0, g // P, P)[g % P] for g in range(3 * P)]
    for epoch in range(3):
        assert sorted(visits[epoch * P:(epoch + 1) * P]) == list(range(P))
    assert visits[:P] != visits[P:2 * P]  # each epoch in a fresh order


def test_a_steps_groups_are_the_same_however_they_are_split_into_micro_batches(tmp_path):
    cache_dir, prompts = fake_cache(tmp_path)
    sizes, _ = gdro.check_cache(cache_dir, prompts)
    sd3 = gdro.family_record("sd3")
    run = gdro.Run(train_args(tmp_path), sd3, None, sd3.scheduler, cache_dir, sizes, torch.device("cpu"))
    whole = gdro.training_batch(run, range(8, 12))
    halves = [gdro.training_batch(run, r) for r in (range(8, 10), range(10, 12))]
    for key in ("x0", "rewards", "t", "eps"):
        torch.testing.assert_close(whole[key], torch.cat([h[key] for h in halves]), rtol=0, atol=0)
    assert whole["x0"].shape[:2] == (4, 6) and len(set(whole["t"].tolist())) == 4  # one t per group


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_accumulation_over_micro_batches_gives_the_one_pass_update(tmp_path, family):
    cache_dir, prompts = fake_cache(tmp_path / "cache", family)
    sizes, _ = gdro.check_cache(cache_dir, prompts)
    loras, grad_norms = [], []
    for micro in ("4", "1"):
        pipe = families.build_tiny_pipeline(gdro.family_record(family))
        args = train_args(tmp_path / micro, "--groups-per-step", "4", "--micro-batch", micro, "--max-steps", "2",
                          "--lora-rank", "4", "--lr", "1e-2", "--log-every", "1")
        args.guidance = 3.5
        run = gdro.Run(args, gdro.family_record(family), type(pipe), dict(pipe.scheduler.config), cache_dir, sizes,
                       torch.device("cpu"))
        lora = gdro.train(pipe.transformer, run)
        loras.append(load_file(lora / gdro.LORA_FILE))
        lines = (tmp_path / micro / "metrics.jsonl").read_text().splitlines()
        grad_norms.append([json.loads(line)["grad_norm"] for line in lines])
    # the gradient itself, before clipping (AdamW's update alone would hide a wrong scale of the loss) ...
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)
    assert loras[0].keys() == loras[1].keys()
    moved = max(v.abs().max().item() for k, v in loras[0].items() if "lora_B" in k)
    assert moved > 1e-3  # ... and the steps, which did change the LoRA, changed it alike
    for k in loras[0]:
        torch.testing.assert_close(loras[0][k], loras[1][k], rtol=1e-3, atol=1e-5)


def test_training_step_runs_forward_and_backward_without_cudnn_attention_or_lora_input_casts(tmp_path):
    """On CUDA, cuDNN's attention backward gives NaN or fails (README), and peft's cast of each LoRA input to fp32
    costs two copies per layer: the training step must run without either, in its forward and in gradient
    checkpointing's recomputation inside the backward."""
    cache_dir, prompts = fake_cache(tmp_path / "cache", "flux", prompts=2)
    sizes, _ = gdro.check_cache(cache_dir, prompts)
    pipe = families.build_tiny_pipeline(gdro.family_record("flux"))
    attention = [m for m in pipe.transformer.modules() if hasattr(m, "processor")]
    seen = []
    for m in attention:  # m.to_q is the LoRA layer once training has added the adapter
        m.register_forward_pre_hook(lambda m, _: seen.append(
            (torch.backends.cuda.cudnn_sdp_enabled(), m.to_q.cast_input_dtype_enabled)) and None)
    args = train_args(tmp_path / "run", "--groups-per-step", "1", "--max-steps", "1")
    args.guidance = 3.5
    assert torch.backends.cuda.cudnn_sdp_enabled()  # PyTorch's default, outside training
    gdro.train(pipe.transformer, gdro.Run(args, gdro.family_record("flux"), type(pipe), dict(pipe.scheduler.config),
                                          cache_dir, sizes, torch.device("cpu")))
    # policy forward + reference forward + the policy's recomputation during backward, for every attention module
    assert len(seen) == 3 * len(attention)
    assert not any(cudnn or cast for cudnn, cast in seen), seen
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored for rollouts and eval
    assert all(m.to_q.cast_input_dtype_enabled for m in attention)  # and peft's default, after the step


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_inputs_kept_in_bf16_give_bit_identical_errors_and_gradients_and_keep_less_for_backward(family):
    # as on CUDA: a bf16 base, an fp32 LoRA, bf16 autocast (here the CPU's)
    transformer = tiny_transformer_with_lora(family).to(torch.bfloat16)
    lora = [p for p in transformer.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float().normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    x0, cond, t, eps = random_groups(family)

    def step(context):
        saved = {}  # bytes of each storage autograd keeps for the backward

        def keep(x):
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x
        with context, torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
            with torch.autocast("cpu", torch.bfloat16):
                err_policy, err_ref = velocity_errors(transformer, family, x0, cond, t, eps)
            loss = gdro_loss(err_policy, err_ref, torch.rand(2, 6, generator=torch.Generator()))
            grads = torch.autograd.grad(loss, lora)
        return err_policy.detach(), grads, sum(saved.values())

    err_cast, grads_cast, saved_cast = step(contextlib.nullcontext())  # peft's default: LoRA inputs cast to fp32
    err, grads, saved = step(gdro.training_context(transformer))
    assert torch.equal(err, err_cast) and not torch.equal(err, err[:, :1].expand_as(err))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_cast)) and any(g.abs().sum() > 0 for g in grads)
    assert saved < saved_cast, (saved, saved_cast)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_blocks_give_the_eager_training_step_bit_for_bit(family):
    # --compile's blocks through torch.compile's graph capture, with what a training step adds: the LoRA, the adapter
    # switched off for the reference, checkpointing's recomputation, training_context. The backend runs each
    # captured graph as it is (no kernel generation: seconds on a CPU; bench.py measures the GPU's)
    transformer = tiny_transformer_with_lora(family)
    lora = [p for p in transformer.parameters() if p.requires_grad]
    for p in lora:
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    transformer.enable_gradient_checkpointing()
    x0, cond, t, eps = random_groups(family)

    def step():
        with gdro.training_context(transformer):
            err_policy, err_ref = velocity_errors(transformer, family, x0, cond, t, eps)
            loss = gdro_loss(err_policy, err_ref, torch.arange(12.0).view(2, 6))
            return err_policy.detach(), err_ref, torch.autograd.grad(loss, lora)

    eager, graphs = step(), []
    families.compile_transformer(transformer, backend=lambda graph, inputs: graphs.append(graph) or graph.forward)
    compiled = step()
    assert graphs, "nothing was compiled"
    assert not torch.equal(eager[0], eager[1])  # a trained LoRA: the policy differs from the reference
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    assert all(torch.equal(a, b) for a, b in zip(compiled[2], eager[2]))

# ----------------------------------------------------------------------------- the plan


def test_dry_run_prints_the_plan_and_the_default_recipe_trains_on_every_cached_prompt(capsys):
    assert gdro.main(["--prompts", "ocr.txt", "--dry-run"]) is None
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n_prompts = len([l for l in open("ocr.txt", encoding="utf-8") if l.strip()])
    assert plan["prompts"] == n_prompts and plan["images_per_prompt"] == 16
    assert plan["groups_trained"] == plan["max_steps"] * plan["groups_per_step"] == 2400
    assert plan["prompt_coverage"] == pytest.approx(2400 / n_prompts, abs=1e-4) and plan["prompt_coverage"] >= 0.99


def test_a_plan_that_leaves_most_of_the_cache_untrained_is_warned_about(capsys):
    gdro.main(["--prompts", "ocr.txt", "--dry-run", "--groups-per-step", "1"])
    out = capsys.readouterr().out
    assert "warning: training visits only 12% of the cached prompts" in out
    assert json.loads(out.strip().splitlines()[-1])["prompt_coverage"] == pytest.approx(300 / 2419, abs=1e-4)

# ----------------------------------------------------------------------------- the pipeline, both families, end to end

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


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_run(request, workdir):
    """One whole tiny run per family: its folder and the LoRA it wrote."""
    out = workdir / f"run_{request.param}"
    return request.param, out, run(workdir, out, "--family", request.param)


@pytest.mark.slow
def test_tiny_run_writes_a_lora_that_loads_into_a_fresh_pipeline_and_changes_it(tiny_run):
    family, out, lora_dir = tiny_run
    assert json.loads((out / "config.json").read_text())["family"] == family
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [5, 10, 15, 20] and all(math.isfinite(l["loss"]) for l in lines)
    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    cond, uncond = gdro.encode_prompt(pipe, fam, 'a sign that reads "Hi"')
    before = gdro.generate(pipe, fam, cond, uncond, [123], 4, fam.guidance, 64)
    pipe.load_lora_weights(str(lora_dir))
    after = gdro.generate(pipe, fam, cond, uncond, [123], 4, fam.guidance, 64)
    assert not torch.allclose(before, after, atol=1e-5)


@pytest.mark.slow
def test_cache_holds_each_prompts_group_and_conditioning_and_says_how_it_was_made(tiny_run):
    family, out, _ = tiny_run
    shard = load_file(out / "cache" / "prompt_000000.safetensors")
    n = families.TINY_RUN["images_per_prompt"]
    assert shard["x0"].shape[0] == shard["rewards"].shape[0] == n
    assert shard["seeds"].tolist() == [gdro.image_seed(0, 0, j, n) for j in range(n)]
    assert {"prompt_embeds", "pooled_prompt_embeds"} <= set(shard)
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["model"] == f"tiny-{family}" and manifest["resolution"] == 64 and manifest["sampler"] == "euler"


@pytest.mark.slow
def test_ranking_accuracy_counts_only_groups_with_a_strict_best_image(tiny_run):
    _, out, _ = tiny_run
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        assert 0 <= m["tied_groups"] <= 1
        assert (m["rank_acc"] is None) == (m["tied_groups"] == 1)  # all tied: no accuracy to report, not a perfect one


@pytest.mark.slow
def test_an_existing_run_is_not_overwritten_without_resume_and_a_cache_made_another_way_is_refused(tiny_run, workdir):
    family, out, _ = tiny_run
    config = (out / "config.json").read_text()
    with pytest.raises(SystemExit, match="--resume"):
        run(workdir, out, "--family", family)
    with pytest.raises(SystemExit, match="resolution=64"):
        run(workdir, out, "--family", family, "--resolution", "32", "--resume")
    with pytest.raises(SystemExit, match="sampler='euler'"):
        run(workdir, out, "--family", family, "--sampler", "unipc", "--resume")
    assert (out / "config.json").read_text() == config  # a refused rerun leaves the run's description alone


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_cache_build_equals_an_uninterrupted_one(workdir, tmp_path, family):
    args = gdro.parse_args(["--prompts", "x", "--tiny", "--images-per-prompt", "4", "--rollout-batch", "3"])
    args.guidance = gdro.family_record(family).guidance
    prompts = gdro.read_prompts(workdir / "prompts.txt", "ocr", 3)
    pipe, fam = gdro.load_pipeline("", tiny=True, family=family)
    calls = []

    def reward(images, prompts_):
        calls.append(prompts_[0])
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return [float(im.convert("L").getextrema()[1]) for im in images]

    interrupt = False
    gdro.build_cache(pipe, fam, prompts, reward, tmp_path / "a", args)
    interrupt, calls = True, []
    with pytest.raises(KeyboardInterrupt):
        gdro.build_cache(pipe, fam, prompts, reward, tmp_path / "b", args)
    interrupt, calls = False, []
    gdro.build_cache(pipe, fam, prompts, reward, tmp_path / "b", args)
    assert calls == prompts[1:]  # the finished shard was not regenerated
    for i in range(len(prompts)):
        a, b = gdro.read_shard(tmp_path / "a", i), gdro.read_shard(tmp_path / "b", i)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ctrl_c_in_training_saves_and_resume_ends_with_the_uninterrupted_lora(workdir, monkeypatch):
    straight = run(workdir, workdir / "straight", "--max-steps", "6", "--save-every", "3")
    calls, real_loss = [], gdro.gdro_loss

    def loss_with_ctrl_c_in_step_5(*a, **kw):
        calls.append(1)
        if len(calls) == 9:  # step 5's first micro-batch (2 groups per step, 1 per micro-batch)
            signal.raise_signal(signal.SIGINT)
        return real_loss(*a, **kw)

    monkeypatch.setattr(gdro, "gdro_loss", loss_with_ctrl_c_in_step_5)
    with pytest.raises(SystemExit, match="interrupted after step 5"):
        run(workdir, workdir / "resumed", "--max-steps", "6", "--save-every", "3")
    monkeypatch.setattr(gdro, "gdro_loss", real_loss)
    assert (workdir / "resumed" / "checkpoints" / "step_000005" / "state.pt").exists()
    resumed = run(workdir, workdir / "resumed", "--max-steps", "6", "--save-every", "3", "--resume")
    a, b = load_file(straight / gdro.LORA_FILE), load_file(resumed / gdro.LORA_FILE)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    steps = [json.loads(l)["step"] for l in (workdir / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 6]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_the_last_good_checkpoint(workdir, monkeypatch):
    real_loss, calls = gdro.gdro_loss, []

    def loss_that_diverges_at_step_3(*a, **kw):
        calls.append(1)
        return real_loss(*a, **kw) * (float("nan") if len(calls) == 7 else 1.0)  # 2 micro-batches per step

    monkeypatch.setattr(gdro, "gdro_loss", loss_that_diverges_at_step_3)
    with pytest.raises(SystemExit, match=r"non-finite loss at step 3.*step_000002"):
        run(workdir, workdir / "diverge", "--save-every", "2")
    assert not (workdir / "diverge" / "checkpoints" / "step_000004").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc"])
def test_a_second_order_sampler_builds_the_cache_and_the_manifest_records_it(workdir, sampler):
    out = workdir / f"sampler_{sampler}"
    lora = run(workdir, out, "--family", "flux", "--sampler", sampler, "--max-steps", "2", "--max-prompts", "2")
    assert (lora / gdro.LORA_FILE).exists()
    assert json.loads((out / "cache" / "manifest.json").read_text())["sampler"] == sampler
    shard = gdro.read_shard(out / "cache", 0)
    assert torch.isfinite(shard["x0"]).all() and shard["x0"].std() > 0.1


def test_tiny_flags_given_explicitly_win_over_the_tiny_defaults():
    args = gdro.parse_args(["--prompts", "p", "--tiny", "--resolution", "32", "--max-steps=7"])
    assert args.resolution == 32 and args.max_steps == 7
    assert args.images_per_prompt == families.TINY_RUN["images_per_prompt"]
    assert gdro.parse_args(["--prompts", "p"]).beta == 12.0  # paper defaults without --tiny


def test_tiny_pipeline_is_reproducible_from_its_seed():
    a, b = (families.build_tiny_pipeline(gdro.Flux(), seed=3) for _ in range(2))
    for (name, p), q in zip(a.transformer.named_parameters(), b.transformer.parameters()):
        assert torch.equal(p, q), name


def test_a_custom_reward_without_its_function_is_refused_before_anything_loads_or_is_written(tmp_path):
    (tmp_path / "reward.py").write_text(BRIGHTNESS)
    (tmp_path / "prompts.txt").write_text("a red sky\n")
    with pytest.raises(gdro.BadInput, match=r"--reward .*reward.py:nope: .* has no function 'nope'") as e:
        gdro.main(["--prompts", str(tmp_path / "prompts.txt"), "--tiny", "--out", str(tmp_path / "out"),
                   "--reward", f"{tmp_path / 'reward.py'}:nope"])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
