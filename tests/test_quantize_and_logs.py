"""--quantize int8 (the frozen base with torchao int8 weights under an fp32 LoRA), --report-to (TensorBoard, W&B
offline), and the progress bars of a run whose stderr is a log file (a line every 5 %, no carriage returns).

The end-to-end cases are real command lines (`python gdro.py --tiny --quantize int8 ...`, one thread each): a run
straight through (logged to TensorBoard), the same run stopped half way (logged to W&B offline) and resumed, and an
NF4 run that this CPU refuses. Run: pytest -q tests/test_quantize_and_logs.py   (about a minute on 2 cores)
"""
import contextlib
import importlib.util
import io
import math
import re
from collections import namedtuple

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

import families
import gdro
from test_distributed import metrics
from test_gdro import random_groups, train_args, velocity_errors, workdir  # noqa: F401 (workdir: a fixture)
from test_standalone import ROOT, python

STEPS = 8  # the straight run's; the stopped one ends at STEPS // 2
# a run of 2 prompts of 6 images (one group each), 2 groups a step, a metrics line a step; the lr raised so that 8
# steps move the LoRA measurably
RUN = ["--tiny", "--quantize", "int8", "--max-prompts", "2", "--images-per-prompt", "6", "--log-every", "1",
       "--lr", "3e-2"]
Run = namedtuple("Run", "out stdout stderr")


def gdro_run(workdir, out, *flags):
    """python gdro.py RUN FLAGS with the work folder's prompts and brightness reward, which must succeed."""
    done = python(ROOT, "gdro.py", *inputs(workdir, out), *RUN, *flags)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return Run(out, done.stdout, done.stderr)


def inputs(workdir, out):
    return ["--prompts", str(workdir / "prompts.txt"), "--reward", f"{workdir / 'reward.py'}:brightness",
            "--out", str(out)]


def int8_transformer_with_lora(args):
    """(the fp32 tiny SD3 transformer of --tiny, the same one loaded again with int8 weights as gdro.main does for
    training, with the LoRA gdro.train adds)."""
    fp32 = families.build_tiny_pipeline(gdro.SD3()).transformer
    int8 = families.quantize(fp32, "int8", None, torch.device("cpu"))
    gdro.add_lora(int8, gdro.SD3.lora_targets, args)
    return fp32, int8


def errors(transformer, x0, cond, t, eps):
    """(err_policy, err_ref) as gdro.train_step computes them."""
    with gdro.training_context(transformer):
        return velocity_errors(transformer, "sd3", x0, cond, t, eps)


@pytest.fixture(scope="module")
def straight(workdir):
    """The int8 run straight through STEPS steps, logged to TensorBoard, its stderr a pipe (not a terminal)."""
    return gdro_run(workdir, workdir / "straight", "--max-steps", str(STEPS), "--report-to", "tensorboard")


@pytest.fixture(scope="module")
def resumed(workdir):
    """The same run stopped at STEPS // 2, logged to W&B offline (HOME and WANDB_DIR in the work folder), then
    resumed with --resume to STEPS, in this process (gdro.main: no second import of diffusers) on one thread as the
    command lines: (the stopped run, the resumed run; its stderr not kept)."""
    out, home = workdir / "resumed", workdir / "home"
    with pytest.MonkeyPatch.context() as env:  # test_standalone.python passes os.environ on
        for name, value in {"HOME": home, "WANDB_DIR": home, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
            env.setenv(name, str(value))
        stopped = gdro_run(workdir, out, "--max-steps", str(STEPS // 2), "--report-to", "wandb")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as said:
            gdro.main([*inputs(workdir, out), *RUN, "--max-steps", str(STEPS), "--resume"])
    finally:
        torch.set_num_threads(threads)
    return stopped, Run(out, said.getvalue(), None)

# ----------------------------------------------------------------------------- the int8 base


def test_an_int8_base_keeps_torchao_weights_under_an_fp32_lora_and_policy_equals_reference_at_init(tmp_path):
    from torchao.utils import TorchAOBaseTensor
    fp32, int8 = int8_transformer_with_lora(train_args(tmp_path, "--lora-rank", "4"))
    targeted = {n for n, _ in fp32.named_modules() if any(n.endswith("." + t) for t in gdro.SD3.lora_targets)}
    wrapped = {n: m for n, m in int8.named_modules() if hasattr(m, "lora_A")}
    assert targeted and wrapped.keys() == targeted  # every targeted layer is a LoRA layer over an int8 one
    for m in wrapped.values():
        weight, lora_a, lora_b = m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight
        assert isinstance(weight, TorchAOBaseTensor) and weight.qdata.dtype == torch.int8, type(weight)
        assert not weight.requires_grad
        assert all(type(p.data) is torch.Tensor and p.dtype == torch.float32 and p.requires_grad
                   for p in (lora_a, lora_b))
    x0, cond, t, eps = random_groups("sd3")
    err_policy, err_ref = errors(int8, x0, cond, t, eps)
    assert err_policy.shape == (2, 6) and torch.equal(err_policy, err_ref)
    # the int8 weights are the ones in use: near the fp32 model's velocity, not equal to it
    x_t = (1 - t[0]) * x0[0, :1] + t[0] * eps[:1]
    one = {k: c[:1] for k, c in cond.items()}
    with torch.no_grad():
        v32, v8 = (gdro.SD3().velocity(m, x_t, t[:1], one) for m in (fp32, int8))
    assert 0 < (v8 - v32).abs().max() < 0.05 * v32.abs().max()
    # and the loss's gradient reaches the LoRA through the int8 layers (B, zero at init, gets one)
    gdro.gdro_loss(err_policy, err_ref, torch.rand(2, 6, generator=torch.Generator().manual_seed(0))).backward()
    grads = [m.lora_B["default"].weight.grad for m in wrapped.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)

# ----------------------------------------------------------------------------- python gdro.py --quantize int8


@pytest.mark.slow
def test_an_int8_run_lowers_the_gdro_loss_on_the_groups_it_trained_on(straight, workdir):
    args = gdro.parse_args([*inputs(workdir, straight.out), *RUN, "--max-steps", str(STEPS)])
    _, int8 = int8_transformer_with_lora(args)
    prompts = gdro.read_prompts(workdir / "prompts.txt", args.reward, args.max_prompts)
    sizes, _ = gdro.check_cache(straight.out / "cache", prompts)
    run = gdro.Run(args, gdro.family_record("sd3"), None, gdro.SD3.scheduler, straight.out / "cache", sizes,
                   torch.device("cpu"))
    batch = gdro.training_batch(run, range(STEPS * args.groups_per_step))

    def loss():
        with torch.no_grad():
            err_policy, err_ref = errors(int8, batch["x0"], batch["cond"], batch["t"], batch["eps"])
        return gdro.gdro_loss(err_policy, err_ref, batch["rewards"], args.beta, args.tau, args.gamma).item()

    at_init = loss()
    trained = load_file(straight.out / "lora" / gdro.LORA_FILE)
    set_peft_model_state_dict(int8, {k.removeprefix("transformer."): v for k, v in trained.items()})
    after = loss()
    assert math.isfinite(at_init) and after < at_init - 1e-3, (at_init, after)  # 7.709 -> 7.690 when written


@pytest.mark.slow
def test_an_int8_runs_lora_loads_whole_into_the_unquantized_pipeline_and_changes_its_output(straight):
    pipe, family = gdro.load_pipeline("", tiny=True, family="sd3")
    assert all(type(p.data) is torch.Tensor for p in pipe.transformer.parameters())  # plain fp32, no torchao
    cond, uncond = gdro.encode_prompt(pipe, family, 'a sign that reads "Hi"')
    draw = lambda: gdro.generate(pipe, family, cond, uncond, [123], 4, gdro.SD3.guidance, 64)
    before = draw()
    pipe.load_lora_weights(str(straight.out / "lora"))
    saved = load_file(straight.out / "lora" / gdro.LORA_FILE)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=next(iter(pipe.transformer.peft_config)))
    assert {f"transformer.{k}" for k in loaded} == saved.keys()
    assert all(torch.equal(v, saved[f"transformer.{k}"]) for k, v in loaded.items())
    assert not torch.allclose(draw(), before, atol=1e-5)


@pytest.mark.slow
def test_an_int8_run_stopped_and_resumed_ends_with_the_straight_runs_lora_bit_for_bit(straight, resumed):
    stopped, again = resumed
    assert f"resumed from {stopped.out / 'checkpoints' / f'step_{STEPS // 2:06d}'}" in again.stdout
    a, b = (load_file(run.out / "lora" / gdro.LORA_FILE) for run in (straight, again))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    steps = [m["step"] for m in metrics(again.out)]
    assert steps == [m["step"] for m in metrics(straight.out)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_nf4_without_cuda_is_refused_in_one_line_naming_quantize_with_exit_code_2(workdir, tmp_path):
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("NF4 runs here")
    done = python(ROOT, "gdro.py", *inputs(workdir, tmp_path / "out"), "--tiny", "--quantize", "nf4")
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "--quantize nf4" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written

# ----------------------------------------------------------------------------- --report-to


@pytest.mark.slow
def test_the_tensorboard_event_file_holds_metrics_jsonls_losses_at_its_steps(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(straight.out / "tensorboard"))
    events.Reload()
    lines = metrics(straight.out)
    assert len(lines) == STEPS
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(m["step"], float(np.float32(m["loss"])))
                                                                   for m in lines]
    figures = {k for m in lines for k, v in m.items() if k != "step" and isinstance(v, (int, float))}
    assert set(events.Tags()["scalars"]) == figures  # every numeric figure of metrics.jsonl, nothing else


@pytest.mark.slow
def test_wandb_offline_writes_a_run_folder_under_out_wandb_whose_wandb_file_holds_the_losses(resumed):
    stopped, _ = resumed
    runs = list((stopped.out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # the stopped run's; the resumed one reported nowhere
    (log,) = runs[0].glob("*.wandb")
    data = log.read_bytes()
    assert data.startswith(b":W&B")  # W&B's transaction log; its history records hold each value as JSON
    for m in metrics(stopped.out)[:STEPS // 2]:
        assert repr(m["loss"]).encode() in data, m

# ----------------------------------------------------------------------------- progress bars in a log file


def test_progress_in_a_log_file_writes_a_line_every_5_percent_and_no_carriage_return(capsys):
    # mininterval=0: time never holds a redraw back, so the count alone decides which lines are written
    for _ in gdro.progress(range(200), "GDRO training", "step", mininterval=0):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 25 and all(line.startswith("GDRO training") for line in lines), lines
    assert sorted({int(re.search(r"(\d+)/200", line)[1]) for line in lines}) == list(range(0, 201, 10))


@pytest.mark.slow
def test_a_runs_stderr_in_a_log_file_has_no_carriage_return_and_its_training_bar_in_few_lines(straight):
    assert "\r" not in straight.stderr
    bar = [line for line in straight.stderr.splitlines() if line.startswith("GDRO training")]
    assert 2 <= len(bar) <= 25 and f"{STEPS}/{STEPS}" in bar[-1], bar
