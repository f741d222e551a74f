"""The text model pretrained on CPU (text_model.build_text_model), at toy size: it is a diffusers folder that the
real from_pretrained path loads, the same seed builds the same weights, and gdro.py trains on it with the OCR reward
through its normal --model path (no --tiny)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gdro
from experiments import text_model as pretraining  # the fixture below is named text_model

HERE = Path(__file__).resolve().parent.parent
TOY = {"variants": 1, "vae_steps": 2, "vae_batch": 4, "steps": 3, "batch": 4, "layers": 1, "train_strings": 16}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return pretraining.build_text_model(tmp_path_factory.mktemp("text_model"), TOY)


def test_text_strings_split_without_overlap_and_the_prompts_quote_the_string():
    splits = pretraining.text_strings()
    assert {k: len(v) for k, v in splits.items()} == {"test": 100, "val": 100, "train": 800}
    assert not set(splits["test"]) & set(splits["train"]) and not set(splits["val"]) & set(splits["train"])
    from reward_ocr import ocr_target
    assert ocr_target(pretraining.TEXT_PROMPT.format("042")) == "042"


@pytest.mark.slow
def test_the_text_model_loads_through_from_pretrained_and_rebuilds_bit_for_bit(text_model, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
    pipe = DiffusionPipeline.from_pretrained(text_model)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.tokenizer_3.model_max_length == 32
    assert gdro.settle_model(gdro.parse_args(["--model", str(text_model)])).resolution == 64  # its own size
    again = pretraining.build_text_model(tmp_path / "again", TOY)
    a, b = (load_file(f / "transformer" / "diffusion_pytorch_model.safetensors") for f in (text_model, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stamp = (text_model / "text_model.json").stat().st_mtime_ns
    assert pretraining.build_text_model(text_model, TOY) == text_model  # built once, then reused
    assert (text_model / "text_model.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="another recipe"):  # never silently rebuilt over
        pretraining.build_text_model(text_model, {**TOY, "steps": 4})
    assert not (text_model / "build").exists()  # the stages' checkpoints are gone once the model is whole


@pytest.mark.slow
def test_gdro_trains_a_lora_on_the_text_model_with_the_ocr_reward(text_model, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "gdro.py", "--model", str(text_model), "--reward", "ocr",
           "--prompts", str(text_model / "train.txt"), "--max-prompts", "2", "--images-per-prompt", "4",
           "--group-size", "2", "--steps", "2", "--max-steps", "2", "--groups-per-step", "2", "--lora-rank", "4",
           "--log-every", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: no CUDA GPU" in done.stdout  # a local model runs on the CPU, with a note
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["model"] == str(text_model) and manifest["resolution"] == 64 and manifest["reward"] == "ocr"
    rewards = torch.cat([load_file(gdro.shard_path(out / "cache", i))["rewards"] for i in range(2)])
    assert rewards.shape == (8,) and ((0 <= rewards) & (rewards <= 1)).all()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "lora" / gdro.LORA_FILE).is_file()


@pytest.mark.slow
def test_a_model_of_another_family_than_expected_stops_in_one_line(text_model):
    with pytest.raises(SystemExit, match=r"is a sd3 model, not flux; pass --family sd3"):
        gdro.load_pipeline(str(text_model), family="flux")
