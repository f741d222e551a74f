"""bench.py: its pure helpers, the builders it shares with test_cuda.py, and a smoke run of `python bench.py --quick`.
Timings on a shared CI machine are noise: of the figures only that each is a positive finite number is asserted."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import families
import gdro
from experiments import bench

FIGURES = ("step_overhead", "rollout_overhead", "ckpt_memory_ratio", "offline_amortization")


def positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_run_prints_every_figure_in_one_json_object_on_its_last_line():
    run = subprocess.run([sys.executable, "-m", "experiments.bench", "--quick"],
                         cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in FIGURES:
        assert positive(result[key]), (key, result[key])
    assert positive(result["matmul_peak_tflops"])
    for name in bench.REAL:
        computed, measured = result["real"][name], result["measured"][name]
        assert computed["params"] > 1e9 and computed["bf16_weight_gib"] > 1  # the real configs, on the meta device
        assert measured["small_config"] is (result["quick"] or result["device"] == "cpu")
        rollout_s = measured["rollout_s"]
        assert set(rollout_s["eager"]) == set(rollout_s["steps"]) == set(families.SAMPLERS)
        assert rollout_s["steps"]["euler"] == bench.SMALL_RUN["steps"]
        assert all(n >= 1 for n in rollout_s["steps"].values())
        assert all(positive(s) for s in rollout_s["eager"].values()), rollout_s
        assert rollout_s["compiled"] is None  # CPU: nothing compiled
        assert positive(measured["rollout_speedup"]["vs_euler"])
        assert list(measured["training"]) == ["ckpt_on_m1", "ckpt_off_m1", "ckpt_on_m2", "ckpt_on_m4",
                                              "ckpt_on_m2_compiled"]
        for setting, row in measured["training"].items():
            if row["compiled"]:
                assert "skipped" in row, row
                continue
            assert all(positive(row[key]) for key in ("step_s", "tflops", "matmul_fraction")), (setting, row)
            assert "peak_gib" in row and math.isfinite(row["loss"])
        assert positive(measured["rollout_in_training_steps"])


def test_the_fastest_training_setting_is_chosen_among_those_that_fit_in_memory():
    training = {"a": {"matmul_fraction": 0.5, "peak_gib": 72.0}, "b": {"matmul_fraction": 0.3, "peak_gib": 27.0},
                "c": {"matmul_fraction": 0.4, "peak_gib": 39.9}, "d": {"oom": True}, "e": {"skipped": "no CUDA"}}
    assert bench.best_within_memory(training, 40) == ("c", training["c"])
    assert bench.best_within_memory(training, 20) == (None, None)


def test_rollout_speedup_is_eager_euler_over_the_fastest_rollout_eager_or_compiled():
    rollout_s = {"steps": {"euler": 10, "unipc": 6}, "eager": {"euler": 9.0, "unipc": 5.6},
                 "compiled": {"euler": 6.0, "unipc": 3.6}}
    speedup = bench.rollout_speedup(rollout_s, baseline_s=10.8)
    assert speedup == {"fastest": "unipc 6 steps compiled", "s": 3.6, "vs_euler": 2.5, "vs_baseline": 3.0}
    assert bench.rollout_speedup({**rollout_s, "compiled": None})["vs_euler"] == pytest.approx(9.0 / 5.6, abs=1e-3)


def test_gpu_targets_are_judged_where_an_architecture_has_them_and_only_within_its_memory(capsys):
    speedup = {"fastest": "unipc 5 steps compiled", "s": 4.0, "vs_euler": 1.4, "vs_baseline": 2.25}
    bench.report_targets({"flux.1-dev": {"training": {"fast": {"matmul_fraction": 0.6, "peak_gib": 72.0},
                                                      "fits": {"matmul_fraction": 0.46, "peak_gib": 30.0}},
                                         "rollout_speedup": speedup},
                          "sd3.5-medium": {"training": {"big": {"matmul_fraction": 0.2, "peak_gib": 20.0}},
                                           "rollout_speedup": speedup}}, small=False)
    flux_training, flux_rollout, sd3_training, sd3_rollout = capsys.readouterr().out.strip().splitlines()
    assert "is fits, at 0.460" in flux_training and flux_training.endswith("(target >= 0.45: met)")
    assert flux_rollout.endswith("(target >= 1.5: MISSED)")
    assert "no setting fits in 16 GiB" in sd3_training and "target" not in sd3_training + sd3_rollout


def test_quantized_weights_shrink_each_architectures_estimate_by_their_bytes_and_nothing_else():
    assert list(bench.WEIGHT_BYTES) == list(gdro.QUANTIZE)  # one figure per --quantize, in its order
    assert bench.WEIGHT_BYTES == {"none": 2, "int8": 1, "nf4": pytest.approx(0.5625)}  # NF4: 4 bits + fp32 per 64
    # a step's LoRA and activations as meta_step counts them (SD3.5-Medium's order of size): never quantized
    found = {"lora_params": 24_000_000, "saved_checkpointed": 2 << 30, "saved_per_block": 1 << 30}
    for name, row in bench.real_architectures(with_flops=False).items():
        gib = {q: bench.training_memory_gib(row["params"], found, q) for q in bench.WEIGHT_BYTES}
        assert gib["none"] > gib["int8"] > gib["nf4"] > 0, (name, gib)
        assert bench.training_memory_gib(row["params"], found) == gib["none"]  # the default: bf16
        rest = bench.training_memory_gib(0, found)  # everything but the frozen weights
        assert all(bench.training_memory_gib(0, found, q) == rest for q in bench.WEIGHT_BYTES)
        weights = {q: g - rest for q, g in gib.items()}
        assert weights["none"] == pytest.approx(row["bf16_weight_gib"], abs=0.01)  # 2 bytes a parameter
        for q, w in weights.items():
            assert w / weights["none"] == pytest.approx(bench.WEIGHT_BYTES[q] / bench.WEIGHT_BYTES["none"]), (name, q)


def test_an_estimate_fits_the_smallest_card_with_a_tenth_to_spare_and_the_table_cells_follow_quantize():
    assert bench.CARD_GB == (24, 48, 80) and bench.CARD_MARGIN == pytest.approx(0.10)
    assert bench.smallest_card(7.1) == 24 and bench.smallest_card(21.6) == 24  # 24 GB less 10 %: 21.6
    assert bench.smallest_card(21.7) == 48 and bench.smallest_card(43.3) == 80 and bench.smallest_card(72.0) == 80
    assert bench.smallest_card(72.1) is None
    assert bench.quantize_labels() == "bf16 / int8 / nf4" and bench.quantize_labels("/") == "bf16/int8/nf4"
    assert bench.quantized({"nf4": 4.1, "none": 7.1, "int8": 5.0}) == "7.1 / 5.0 / 4.1"
    assert bench.quantized({"none": None, "int8": 48, "nf4": 24}, "/") == ">80/48/24"
    assert bench.quantized(None) == ""


def test_peak_memory_counts_live_bytes_on_cpu():
    def run():
        a = torch.empty(4 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)  # 6 MiB live together
        del a, b
        c = torch.empty(1 << 20, dtype=torch.uint8)  # freed by then: the peak stays 6 MiB
        del c
        return "done"
    assert bench.peak_memory(run, torch.device("cpu")) == ("done", 6 << 20)


def test_amortization_is_the_epoch_count_when_training_is_free_and_one_after_one_epoch():
    assert bench.offline_amortization(20, 0, epochs=3) == pytest.approx(3)
    assert bench.offline_amortization(20, 7, epochs=1) == pytest.approx(1)
    assert bench.offline_amortization(20, 7, epochs=4) > bench.offline_amortization(20, 7, epochs=2) > 1


def test_training_an_image_costs_its_two_forwards_and_its_backward_in_forwards():
    # forward counts the policy's and the reference's pass together: a backward of one pass's FLOPs costs one forward
    assert bench.train_cost({"forward": 2e9, "backward": 1e9}) == pytest.approx(3)
    assert bench.train_cost({"forward": 2e9, "backward": 0}) == pytest.approx(2)


def test_relative_rms_is_each_images_error_over_its_size_averaged_over_images():
    reference = torch.randn(2, 4, 8, 8)
    assert bench.relative_rms(reference, reference) == 0
    off = reference.clone()
    off[0] *= 1.2  # image 0 off by 20 %, image 1 exact
    assert bench.relative_rms(off, reference) == pytest.approx(0.1, rel=1e-5)


def test_markdown_table_has_a_line_per_row_a_column_per_header_cell_and_aligns_each_column():
    table = bench.markdown_table(["sampler \\ steps", 2, 4], [["euler", 0.1, 0.05], ["unipc", "0.0800", "0.0200"]],
                                 "lrr")
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.count("|") == 4 for line in lines)
    assert lines[0] == "| sampler \\ steps | 2 | 4 |" and lines[1] == "| --- | ---: | ---: |"
    assert lines[2] == "| euler | 0.1 | 0.05 |" and lines[3] == "| unipc | 0.0800 | 0.0200 |"


@pytest.mark.slow
def test_euler_at_the_reference_step_count_is_the_reference_and_fewer_steps_are_not():
    study = dict(reference_steps=8, prompts=["a red apple"], seeds=(0,))
    found = bench.sampler_distances("sd3", samplers=("euler", "unipc"), steps=(2, 8), **study)
    assert found["euler"][8] == 0
    assert found["euler"][2] > 0 and found["unipc"][2] > 0
    solved = bench.distance_to_reference.cache_info().misses
    again = bench.sampler_distances("sd3", samplers=("unipc",), steps=(2,), **study)
    assert bench.distance_to_reference.cache_info().misses == solved  # the reference is solved once, then shared
    assert again["unipc"][2] == found["unipc"][2]


def test_small_configs_keep_the_real_conditioning_shapes_and_only_shrink_the_models():
    for name, real in bench.REAL.items():
        small = bench.architecture(name, small=True)
        assert small["family"] == real["family"] and small["text_encoders"] == real["text_encoders"]
        pipe = bench.build_pipeline(small, torch.device("cpu"), torch.float32)
        cond, _ = gdro.encode_prompt(pipe, gdro.family_record(real["family"]), 'a sign that reads "Hi"')
        assert {k: tuple(v.shape[1:]) for k, v in cond.items()} == {
            k: real["shapes"][k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
        assert sum(p.numel() for p in pipe.transformer.parameters()) < 1e8


def test_the_bare_work_measured_after_each_step_leaves_training_unchanged(tmp_path):
    g = torch.Generator().manual_seed(0)  # a cache of random latents of the tiny SD3 model's shapes (64 px)
    gdro.write_shard(tmp_path / "cache", 0, "p", {"x0": torch.randn(8, 16, 16, 16, generator=g),
                                                 "rewards": torch.rand(8, generator=g),
                                                 "prompt_embeds": torch.randn(7, 64, generator=g),
                                                 "pooled_prompt_embeds": torch.randn(64, generator=g)})
    loras = []
    for measured in (False, True):
        transformer = families.build_tiny_pipeline(gdro.family_record("sd3")).transformer
        args = bench.train_args(tmp_path / str(measured), "sd3", 4, ckpt=True)  # the CUDA default: recomputation
        if measured:
            pairs, loss = bench.timed_training(transformer, "sd3", tmp_path / "cache", [8], args, torch.device("cpu"))
            assert len(pairs) == 3 and all(full > 0 and bare > 0 for full, bare in pairs)  # steps 1 to 3
            assert math.isfinite(loss)
        else:
            bench.train(transformer, "sd3", tmp_path / "cache", [8], args, torch.device("cpu"))
        loras.append({k: v.detach().clone() for k, v in transformer.state_dict().items() if "lora" in k})
    assert loras[0].keys() == loras[1].keys() and loras[0]
    for k in loras[0]:
        torch.testing.assert_close(loras[0][k], loras[1][k], rtol=0, atol=0)
