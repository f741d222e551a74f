"""Tests of eval.py: the report, same-seed base vs LoRA images, the judge's parser and plumbing, the corrected score.

Tiny random models only (no download): one tiny GDRO run makes a LoRA with a cheap reward, a tiny random
Qwen2.5-VL stands in for the UnifiedReward judge. Run: pytest -q tests/test_eval.py
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

import eval as gdro_eval
import gdro

HERE = Path(__file__).resolve().parent.parent  # eval.py's folder
PROMPTS = ['A shop sign that reads "Open"', 'A coffee mug that says "Hello World"', 'A road sign "Stop" at dusk']

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny GDRO run (mean-brightness reward): checkpoints at steps 2 and 4, the final LoRA."""
    d = tmp_path_factory.mktemp("eval")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "bright.py").write_text("import numpy as np\n"
                                 "def bright(images, prompts):\n"
                                 "    return [float(np.asarray(im).mean()) / 255 for im in images]\n")
    lora = gdro.main(["--prompts", str(d / "prompts.txt"), "--tiny", "--out", str(d / "run"),
                      "--reward", f"{d / 'bright.py'}:bright", "--max-prompts", "2", "--images-per-prompt", "2",
                      "--group-size", "2", "--max-steps", "4", "--save-every", "2", "--lr", "3e-2"])
    return {"dir": d, "prompts": d / "prompts.txt", "lora": lora, "checkpoints": d / "run" / "checkpoints"}


@pytest.fixture(scope="module")
def evaluated(run):
    out = run["dir"] / "eval"
    report = gdro_eval.main(["--prompts", str(run["prompts"]), "--tiny", "--lora", str(run["lora"]),
                             "--checkpoints", str(run["checkpoints"]), "--judge", "none", "--out", str(out)])
    return report, out


def build_tiny_judge():
    """A tiny random Qwen2.5-VL and its processor, built in memory: a character-level tokenizer with Qwen's
    special tokens and a minimal chat template, a small image processor (a 64 px image -> 4 image tokens)."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    vocab = {t: i for i, t in enumerate(special + [chr(c) for c in range(32, 127)] + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=special[1:])
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56}),
        video_processor=Qwen2VLVideoProcessor(), tokenizer=tokenizer, chat_template=template)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4},
                         bos_token_id=0, eos_token_id=vocab["<|im_end|>"], pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    model, processor = build_tiny_judge()
    folder = tmp_path_factory.mktemp("judge")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def pixels(path):
    return np.asarray(Image.open(path))


def grid_size(columns, rows):
    return (gdro_eval.GRID_LABEL_W + columns * gdro_eval.GRID_TILE,
            gdro_eval.GRID_HEADER + rows * (gdro_eval.GRID_TILE + gdro_eval.GRID_CAPTION))

# ----------------------------------------------------------------------------- report, images, grid, trend


@pytest.mark.slow
def test_report_has_the_documented_keys_and_sane_values(evaluated):
    report, out = evaluated
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report) == {"base", "lora"}
    for entry in report.values():
        assert set(entry) == {"ocr_reward", "ocr_exact", "n_images", "judge", "corrected_score", "nan_images"}
        assert entry["n_images"] == 3 and entry["nan_images"] == 0  # --tiny keeps up to 4 prompts of 3; 1 image each
        assert 0.0 <= entry["ocr_reward"] <= 1.0
        assert entry["judge"] is None and entry["corrected_score"] is None  # --judge none
    for name in ("base", "lora", "step_000002", "step_000004"):
        assert sorted(p.name for p in (out / "images" / name).iterdir()) == ["0000_0.png", "0001_0.png", "0002_0.png"]
    assert pixels(out / "images" / "base" / "0000_0.png").shape == (64, 64, 3)  # --tiny's resolution
    lines = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 4 * 3 and {l["seed"] for l in lines} == {10**6, 10**6 + 1, 10**6 + 2}
    # base | lora (the final LoRA is the newest checkpoint, so no third column), one row per prompt
    assert Image.open(out / "grid.png").size == grid_size(2, 3)
    trend = json.loads((out / "trend.json").read_text())
    assert [p["step"] for p in trend] == [0, 2, 4] and trend[0]["ocr_reward"] == report["base"]["ocr_reward"]
    assert Image.open(out / "trend.png").size[0] > 0


@pytest.mark.slow
def test_grid_with_checkpoints_alone_shows_base_and_the_newest_checkpoint(run):
    out = run["dir"] / "eval_ckpts"
    gdro_eval.main(["--prompts", str(run["prompts"]), "--tiny", "--max-prompts", "2",
                    "--checkpoints", str(run["checkpoints"]), "--judge", "none", "--out", str(out)])
    grid = pixels(out / "grid.png")
    assert grid.shape[1::-1] == grid_size(2, 2)
    tile, x, y = gdro_eval.GRID_TILE, gdro_eval.GRID_LABEL_W, gdro_eval.GRID_HEADER
    for c, name in enumerate(("base", "step_000004")):  # the tile of prompt 0 in column c is that set's image
        image = np.asarray(Image.open(out / "images" / name / "0000_0.png").convert("RGB").resize((tile, tile)))
        assert np.array_equal(grid[y:y + tile, x + c * tile:x + (c + 1) * tile], image)


@pytest.mark.parametrize("sets, twins, columns, labels", [
    (["base"], {}, ["base"], ["base"]),
    (["base", "lora"], {}, ["base", "lora"], ["base", "LoRA"]),
    (["base", "step_000002", "step_000004"], {}, ["base", "step_000004"], ["base", "step 4"]),
    (["base", "step_000002", "step_000300", "lora"], {"lora": "step_000300"}, ["base", "lora"],
     ["base", "LoRA = step 300"]),
    (["base", "step_000002", "step_000300", "lora"], {}, ["base", "step_000300", "lora"],
     ["base", "step 300", "LoRA"]),
    (["base", "step_000002", "step_000004", "lora"], {"step_000004": "step_000002", "lora": "step_000002"},
     ["base", "lora"], ["base", "LoRA = step 2"]),  # the LoRA stopped changing after step 2
])
def test_grid_has_one_labelled_column_per_set_shown_at_most_three(sets, twins, columns, labels):
    got = gdro_eval.grid_columns(dict.fromkeys(sets), twins)
    assert got == columns and [gdro_eval.column_label(c, twins) for c in got] == labels


def test_fit_lines_keeps_to_the_width_and_marks_a_cut():
    font = ImageFont.load_default(size=13)
    text = 'A neon sign that reads "Open Late" above a rainy street, reflections, cinematic ' * 3
    lines = gdro_eval.fit_lines(text, font, 150, 3)
    assert len(lines) == 3 and lines[-1].endswith("…") and all(font.getlength(l) <= 150 for l in lines)
    assert " ".join(gdro_eval.fit_lines("short prompt", font, 150, 3)) == "short prompt"
    assert gdro_eval.fit_lines("x" * 200, font, 150, 3)[0].endswith("…")  # one word wider than the margin


@pytest.mark.slow
def test_the_final_lora_is_the_last_checkpoint_and_changes_the_images(evaluated):
    _, out = evaluated
    for k in range(3):
        name = f"000{k}_0.png"
        assert np.array_equal(pixels(out / "images" / "lora" / name), pixels(out / "images" / "step_000004" / name))
    assert any(not np.array_equal(pixels(out / "images" / "lora" / f"000{k}_0.png"),
                                  pixels(out / "images" / "base" / f"000{k}_0.png")) for k in range(3))


@pytest.mark.slow
def test_same_seeds_lora_at_scale_0_equals_base_and_the_judge_counts_garbage(run, evaluated, tiny_judge):
    """Through the CLI with a local judge folder: LoRA scaled to 0 gives exactly the base images (same seeds, adapter
    unloaded/loaded cleanly), base images are reproducible across runs, and the tiny random judge's garbage answers
    are counted as unparsed, never scored."""
    out = run["dir"] / "eval_scale0"
    report = gdro_eval.main(["--prompts", str(run["prompts"]), "--tiny", "--max-prompts", "2", "--lora",
                             str(run["lora"]), "--lora-scale", "0", "--judge", str(tiny_judge[2]),
                             "--judge-max-new-tokens", "12", "--out", str(out)])
    for k in range(2):
        name = f"000{k}_0.png"
        base = pixels(out / "images" / "base" / name)
        assert np.array_equal(base, pixels(out / "images" / "lora" / name))
        assert np.array_equal(base, pixels(evaluated[1] / "images" / "base" / name))
    for entry in report.values():
        assert entry["n_images"] == 2
        assert entry["judge"] == {"alignment": None, "coherence": None, "style": None, "mean": None, "unparsed": 2}
        assert entry["corrected_score"] is None
    lines = [json.loads(l) for l in (out / "scores.jsonl").read_text().splitlines()]
    assert all(isinstance(l["judge_answer"], str) and l["judge"] is None for l in lines)


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "missing.txt"], "--prompts missing.txt: file not found"),
    (["--lora", "missing_lora"], "LoRA folder"),
    (["--checkpoints", "missing_ckpts"], "checkpoints folder"),
])
@pytest.mark.slow
def test_bad_input_fails_with_one_line_before_heavy_work(run, argv, message):
    base = ["--prompts", str(run["prompts"]), "--tiny", "--judge", "none", "--out", str(run["dir"] / "bad")]
    with pytest.raises(SystemExit, match=message) as e:
        gdro_eval.main(base + argv)
    assert "\n" not in str(e.value)
    assert not (run["dir"] / "bad").exists()


@pytest.mark.slow
def test_a_damaged_lora_file_is_refused_in_one_line_naming_it_before_the_model_loads(run, tmp_path):
    lora = tmp_path / "lora"
    shutil.copytree(run["lora"], lora)
    data = bytearray((lora / gdro.LORA_FILE).read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # same size, still loadable, wrong
    (lora / gdro.LORA_FILE).write_bytes(bytes(data))
    with pytest.raises(gdro.BadInput, match=f"^LoRA file {lora / gdro.LORA_FILE} is damaged") as e:
        gdro_eval.main(["--prompts", str(run["prompts"]), "--tiny", "--lora", str(lora), "--judge", "none",
                        "--out", str(tmp_path / "eval")])
    assert e.value.code == 2 and "\n" not in str(e.value) and not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_a_lora_of_another_family_is_refused_before_generating(run):
    out = run["dir"] / "bad_family"
    with pytest.raises(gdro.BadInput, match="^LoRA .* fit no layer of this transformer"):
        gdro_eval.main(["--prompts", str(run["prompts"]), "--tiny", "--family", "flux", "--lora", str(run["lora"]),
                        "--judge", "none", "--out", str(out)])
    assert not out.exists()


@pytest.mark.slow
def test_a_model_folder_that_does_not_load_is_one_line(run, tmp_path):
    with pytest.raises(SystemExit, match="^error: cannot load model"):
        gdro_eval.main(["--prompts", str(run["prompts"]), "--model", str(tmp_path / "missing"), "--judge", "none",
                        "--out", str(tmp_path / "eval")])

# ----------------------------------------------------------------------------- every input refused before a model loads


def lora_folder(folder, tensors=None, data=None):
    """A LoRA folder holding these tensors (or these bytes) as its file, with no sha256.json."""
    folder.mkdir(parents=True)
    if data is None:
        save_file(tensors, folder / gdro.LORA_FILE, metadata={"format": "pt"})
    else:
        (folder / gdro.LORA_FILE).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of bad inputs, each named as REFUSED's {d}/NAME: LoRA files that are not whole or not a transformer
    LoRA, checkpoint folders holding none, judge folders of no model or another model, a file where a folder goes."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "notes.txt").write_text("mine")
    pair = lambda layer, a, b: {f"transformer.{layer}.lora_A.weight": torch.ones(a), f"transformer.{layer}.lora_B."
                                "weight": torch.ones(b)}
    good = pair("transformer_blocks.0.attn.to_q", (4, 32), (32, 4))  # the tiny SD3's layer and sizes
    whole = lora_folder(d / "whole", good).joinpath(gdro.LORA_FILE).read_bytes()
    lora_folder(d / "garbage", data=b"not a safetensors file, just text " * 4)
    lora_folder(d / "truncated", data=whole[:len(whole) // 2])
    lora_folder(d / "unet", {k.replace("transformer.", "unet."): v for k, v in good.items()})
    lora_folder(d / "unpaired", {k: v for k, v in good.items() if "lora_A" in k})
    lora_folder(d / "damaged", good)
    gdro.record_sha256(d / "damaged")
    (d / "damaged" / gdro.LORA_FILE).write_bytes(whole[:-64] + bytes(64))  # same size, loadable, wrong
    lora_folder(d / "other_size", pair("transformer_blocks.0.attn.to_q", (4, 64), (64, 4)))  # a wider model's
    (d / "empty").mkdir()
    (d / "unfinished" / "step_000002").mkdir(parents=True)  # a checkpoint folder without its LoRA file
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (d / "read_only").mkdir(mode=0o555)
    return d


ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the permissions say")
REFUSED_CLI = [  # (flags, what the one line says), {d}: the inputs fixture's folder; each also as a command line
    (["--lora", "{d}/missing"], "--lora {d}/missing: not a LoRA folder"),
    (["--lora", "{d}/garbage"], "LoRA file {d}/garbage/pytorch_lora_weights.safetensors is unreadable (Error while"),
    (["--lora", "{d}/truncated"], "truncated/pytorch_lora_weights.safetensors is unreadable (Error while"),
    (["--lora", "{d}/unet"], "holds unet.transformer_blocks.0.attn.to_q.lora_A.weight [4, 32]: not a LoRA of a "
                             "transformer (keys transformer.LAYER.lora_A.weight and lora_B.weight"),
    (["--resolution", "100"], f"--resolution 100: must be a positive multiple of {gdro.RESOLUTION_FACTOR}"),
    (["--out", "{d}/notes.txt"], "--out {d}/notes.txt is a file, not a folder"),
    pytest.param(["--out", "{d}/read_only/eval"], "{d}/read_only is not a writable folder", marks=ROOT),
    (["--checkpoints", "{d}/missing"], "--checkpoints {d}/missing: checkpoints folder not found"),
    (["--checkpoints", "{d}/empty"], "--checkpoints {d}/empty holds no step_* checkpoint"),
    (["--judge", "{d}/bert"], "--judge {d}/bert is a 'bert' model; expected a UnifiedReward (Qwen2.5-VL) model"),
    *[([flag, value], f"{flag} {value}: must be at least 1") for flag, value in [
        ("--images-per-prompt", "0"), ("--batch", "-1"), ("--judge-batch", "0"), ("--steps", "0"),
        ("--max-prompts", "0")]],
    (["--lora-scale", "nan"], "--lora-scale nan: must be finite"),
    (["--guidance", "-1"], "--guidance -1.0: must be finite and >= 0"),
]
REFUSED = REFUSED_CLI + [  # more of the same kinds
    (["--lora", "{d}/notes.txt"], "--lora {d}/notes.txt: not a LoRA folder"),
    (["--lora", "{d}/damaged"], "damaged/pytorch_lora_weights.safetensors is damaged (not what its sha256.json"),
    (["--lora", "{d}/unpaired"], "has no lora_A and lora_B of one rank for transformer_blocks.0.attn.to_q"),
    (["--lora", "{d}/whole", "{d}/garbage"], "garbage/pytorch_lora_weights.safetensors is unreadable"),
    (["--checkpoints", "{d}/unfinished"], "--checkpoints {d}/unfinished holds no step_* checkpoint"),
    (["--resolution", "0"], "--resolution 0: must be a positive multiple"),
    (["--resolution", "-16"], "--resolution -16: must be a positive multiple"),
    (["--out", "{d}/notes.txt/eval"], "--out {d}/notes.txt/eval: {d}/notes.txt is a file, not a folder"),
    (["--judge", "{d}/empty"], "--judge {d}/empty: cannot load its config"),
    (["--judge", "{d}/missing"], "--judge {d}/missing: folder not found"),
    *[([flag, value], f"{flag} {value}: must be at least 1") for flag, value in [
        ("--images-per-prompt", "-1"), ("--max-prompts", "-2"), ("--judge-max-new-tokens", "0")]],
    (["--lora-scale", "inf"], "--lora-scale inf: must be finite"),
    (["--guidance", "nan"], "--guidance nan: must be finite and >= 0"),
    (["--seed", "-1"], "--seed -1: must be >= 0"),
]
FLAGS = lambda value: " ".join(value).replace("{d}/", "") if isinstance(value, list) else ""  # test ids: the flags


def case(inputs, flags, line):
    """(eval.py's flags, the line it must say): the prompts, then the bad flags, their {d} filled in."""
    fill = lambda text: text.replace("{d}", str(inputs))
    out = [] if "--out" in flags else ["--out", str(inputs / "eval")]  # never made: nothing is written
    return ["--prompts", str(inputs / "prompts.txt"), "--judge", "none", *out, *map(fill, flags)], fill(line)


class ModelLoad(Exception):
    """Raised instead of loading the model: every input was accepted."""


def load_pipeline(*args, **kwargs):
    raise ModelLoad


@pytest.mark.parametrize("flags, line", REFUSED, ids=FLAGS)
def test_a_bad_input_is_refused_with_a_bad_input_before_the_model_loads(inputs, flags, line, monkeypatch):
    argv, line = case(inputs, flags, line)
    monkeypatch.setattr(gdro, "load_pipeline", load_pipeline)
    with pytest.raises(gdro.BadInput) as e:
        gdro_eval.main(argv)
    assert e.value.code == 2 and "\n" not in str(e.value) and line in str(e.value)
    assert not (inputs / "eval").exists() and (inputs / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("flags, line", REFUSED_CLI, ids=FLAGS)
def test_the_command_line_refuses_a_bad_input_with_one_line_exit_2_and_no_traceback_in_seconds(inputs, flags, line):
    """Offline and without --tiny: an input let through would end at the model load, another line and exit 1."""
    argv, line = case(inputs, flags, line)
    t0 = time.perf_counter()
    cli = subprocess.run([sys.executable, "eval.py", *argv], cwd=HERE, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert (cli.returncode, len(cli.stderr.splitlines())) == (2, 1), cli.stderr
    assert cli.stderr.startswith("error: ") and line in cli.stderr, cli.stderr
    assert time.perf_counter() - t0 < 30 and not (inputs / "eval").exists()


@pytest.mark.slow
def test_a_lora_that_fits_no_layer_of_the_loaded_model_is_one_line_exit_2_before_any_image(inputs):
    """The header says a transformer LoRA; the loaded transformer says not this one: a layer of another size."""
    out = inputs / "eval_other_size"
    cli = subprocess.run([sys.executable, "eval.py", "--prompts", str(inputs / "prompts.txt"), "--tiny", "--lora",
                          str(inputs / "other_size"), "--judge", "none", "--out", str(out)], cwd=HERE,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [l for l in cli.stderr.splitlines() if l.startswith("error")]  # beside the libraries' import notes
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and len(errors) == 1, cli.stderr
    assert errors[0] == (f"error: LoRA {inputs / 'other_size'}: 1 of its 1 layers fit no layer of this transformer, "
                         "e.g. transformer_blocks.0.attn.to_q (32 -> 32 features there, 64 -> 64 in the LoRA); a LoRA "
                         "of another model or family?")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("nan_weights, scale", [(True, "1"), (False, "1e30")])
def test_images_that_are_not_finite_are_counted_in_the_report_and_warned_about(run, tmp_path, capsys, nan_weights,
                                                                                scale):
    """A LoRA of NaN weights, or a scale that overflows, scores every image 0: counted per set, and said."""
    lora = run["lora"]
    if nan_weights:
        lora = lora_folder(tmp_path / "nan_lora", {k: torch.full_like(v, float("nan"))
                                                   for k, v in load_file(run["lora"] / gdro.LORA_FILE).items()})
    report = gdro_eval.main(["--prompts", str(run["prompts"]), "--tiny", "--max-prompts", "2", "--lora", str(lora),
                             "--lora-scale", scale, "--judge", "none", "--out", str(tmp_path / "eval")])
    assert (report["base"]["nan_images"], report["lora"]["nan_images"]) == (0, 2)
    assert report["lora"]["ocr_reward"] == 0.0
    warnings = [l for l in capsys.readouterr().out.splitlines() if l.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: lora: 2 of 2 images have NaN or inf latents")


def test_the_trend_is_a_png_of_labelled_axes_round_steps_and_a_legend(tmp_path):
    points = [{"step": s, "ocr_reward": 0.2 + s / 2000, "corrected_score": None if s == 0 else 0.4 - s / 4000}
              for s in (0, 312, 623, 935)]  # the steps of gdro.py --save-every 312
    for name, judged in (("trend.png", True), ("unjudged.png", False)):
        fig = gdro_eval.draw_trend(tmp_path / name, points if judged else
                                   [{**p, "corrected_score": None} for p in points])
        ax, = fig.axes
        assert ax.get_xlabel().startswith("training step") and ax.get_ylabel() == "score"
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["OCR reward", "corrected score"][:1 + judged]
        steps = [t for t in ax.get_xticks() if 0 <= t <= 935]
        assert len(steps) >= 3 and all(t % 50 == 0 for t in steps), steps  # not 312, 623, 935
        low, high = ax.get_ylim()
        assert low < 0 and high > 1  # the reward's whole range
        image = Image.open(tmp_path / name).convert("RGB")
        assert image.size == (720, 440) and len(image.getcolors(1 << 16)) > 50  # drawn, not blank

# ----------------------------------------------------------------------------- the judge


@pytest.mark.parametrize("answer, expected", [
    ("Alignment Score (1-5): 4\nCoherence Score (1-5): 3\nStyle Score (1-5): 5", (4, 3, 5)),
    ("The sign is legible but the gate is warped.\n\nAlignment Score (1-5): 2.69\nCoherence Score (1-5): 3.5\n"
     "Style Score (1-5): 3.25", (2.69, 3.5, 3.25)),
    ("Style Score (1-5): 1\nAlignment Score (1-5): 5\nCoherence Score (1-5): 2", (5, 2, 1)),  # reordered
    ("**Alignment Score (1-5):** 4.0\n**Coherence Score (1-5)**: 4\n**Style score:** 3", (4, 4, 3)),  # markdown
    ("Alignment Score (1-5): 4\nStyle Score (1-5): 3", None),  # coherence missing
    ("Alignment Score (1-5): X\nCoherence Score (1-5): Y\nStyle Score (1-5): Z", None),  # the template echoed
    ("Alignment Score (1-5): 7\nCoherence Score (1-5): 3\nStyle Score (1-5): 3", None),  # outside 1-5
    ('8pgr1KSo"jZ4"jZ4 Ga/!4', None),  # garbage
    ("", None),
])
def test_parse_judge(answer, expected):
    got = gdro_eval.parse_judge(answer)
    if expected is None:
        assert got is None
    else:
        assert got == dict(zip(("alignment", "coherence", "style"), map(float, expected)))


def test_corrected_score_and_summary_on_hand_made_numbers():
    assert gdro_eval.corrected_score(0.8, 4.0) == pytest.approx(1.0)  # 0.8 * 1 + 0.2
    assert gdro_eval.corrected_score(0.37, 3.0) == pytest.approx(0.2)  # a neutral judge ignores the reward
    assert gdro_eval.corrected_score(1.0, 1.0) == pytest.approx(-1.8)  # hacked: full reward, the judge hates it
    assert gdro_eval.corrected_score(0.5, 4.5) == pytest.approx(0.95)
    scores = [{"alignment": 4.0, "coherence": 5.0, "style": 3.0}, None,
              {"alignment": 2.0, "coherence": 3.0, "style": 4.0}]
    s = gdro_eval.summarize([1.0, 0.5, 0.0], scores)
    assert s["ocr_reward"] == pytest.approx(0.5) and s["ocr_exact"] == pytest.approx(1 / 3) and s["n_images"] == 3
    assert s["judge"] == pytest.approx({"alignment": 3.0, "coherence": 4.0, "style": 3.5, "mean": 3.5, "unparsed": 1})
    assert s["corrected_score"] == pytest.approx(0.5 * (3.5 - 3) + 0.2)
    assert gdro_eval.summarize([0.3], None) == {"ocr_reward": 0.3, "ocr_exact": 0.0, "n_images": 1, "judge": None,
                                                "corrected_score": None}


def test_judge_prompt_is_the_trained_format():
    p = gdro_eval.JUDGE_PROMPT
    assert p.startswith("You are presented with a generated image and its associated text caption.")
    assert "Alignment Score (1-5): X\nCoherence Score (1-5): Y\nStyle Score (1-5): Z\n" in p
    assert p.endswith("Your task is provided as follows:\nText Caption: [{prompt}]")


@pytest.mark.slow
def test_judge_plumbing_on_a_tiny_random_qwen25_vl(tiny_judge, monkeypatch):
    model, processor, _ = tiny_judge
    processor.tokenizer.padding_side = "left"
    seen = []
    template = processor.apply_chat_template
    monkeypatch.setattr(processor, "apply_chat_template", lambda m, **kw: seen.append(m) or template(m, **kw))
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    prompts = ['A sign that reads "Open"', 'A much longer prompt: a neon sign that says "Closed", rainy night']
    answers = gdro_eval.judge_answers(model, processor, images, prompts, max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    for messages, prompt in zip(seen, prompts):  # one user message: the image first, then the exact text
        assert [m["role"] for m in messages] == ["user"]
        assert messages[0]["content"] == [{"type": "image"},
                                          {"type": "text", "text": gdro_eval.JUDGE_PROMPT.replace("{prompt}", prompt)}]
    # greedy and left-padded: a batch answers as each image alone does
    assert answers == [gdro_eval.judge_answers(model, processor, [im], [p], 8)[0] for im, p in zip(images, prompts)]
    assert [gdro_eval.parse_judge(a) for a in answers] == [None, None]  # a random model writes garbage


@pytest.mark.slow
def test_a_quantized_base_draws_images_close_to_the_fp32_bases_from_the_same_seeds(run, evaluated):
    """eval.py --quantize int8: the base (and each LoRA) on torchao int8 weights, as gdro.py --quantize trains against;
    not the fp32 model's images, but close to them (the text model's held-out OCR: docs/cost.md)."""
    out = run["dir"] / "eval_int8"
    report = gdro_eval.main(["--prompts", str(run["prompts"]), "--tiny", "--max-prompts", "2", "--quantize", "int8",
                             "--lora", str(run["lora"]), "--judge", "none", "--out", str(out)])
    assert report["base"]["n_images"] == 2 and json.loads((out / "config.json").read_text())["quantize"] == "int8"
    for k in range(2):
        quantized, fp32 = (pixels(d / "images" / "base" / f"000{k}_0.png").astype(int) for d in (out, evaluated[1]))
        assert (quantized != fp32).any() and abs(quantized - fp32).mean() < 8, abs(quantized - fp32).mean()


@pytest.mark.slow
def test_a_custom_reward_on_prompts_that_quote_nothing_gets_its_report_and_grid(tmp_path):
    (tmp_path / "p.txt").write_text("a red sky\na blue car\n")
    reward = f"{HERE / 'experiments' / 'toy_reward.py'}:colour_reward"
    report = gdro_eval.main(["--prompts", str(tmp_path / "p.txt"), "--tiny", "--reward", reward, "--judge", "none",
                             "--out", str(tmp_path / "eval")])
    assert report["base"]["n_images"] == 2 and (tmp_path / "eval" / "grid.png").is_file()
