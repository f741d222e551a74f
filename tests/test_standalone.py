"""gdro.py stands alone: copied into an empty folder with nothing of the project beside it, it answers --help and
--dry-run, exports the method, and trains a LoRA on an SD3 and a FLUX.1 pipeline folder with a reward of your own;
with reward_ocr.py beside it, --reward ocr works. And what gdro.py imports when asked never imports gdro back.

Run: pytest -q tests/test_standalone.py   (about a minute: each case is a fresh Python process)
"""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import families
import gdro

ROOT = Path(__file__).resolve().parent.parent
REWARD = '''
def brightness(images, prompts):
    return [sum(im.convert("L").getdata()) / (255 * im.width * im.height) for im in images]
'''
PROMPTS = 'a sign that reads "12"\na wall with the word "OPEN" on it\n'


def alone(tmp_path, *companions):
    """An empty folder holding gdro.py (and the named companions), a prompt file and a reward file."""
    folder = tmp_path / "alone"
    folder.mkdir()
    for name in ("gdro.py", *companions):
        shutil.copy(ROOT / name, folder / name)
    (folder / "prompts.txt").write_text(PROMPTS)
    (folder / "my_reward.py").write_text(REWARD)
    return folder


def python(folder, *args, timeout=300):
    """python ARGS in folder, with none of the project on the path (only what is in the folder)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def run(folder, *args):
    """python ARGS in folder, which must succeed; its stdout."""
    done = python(folder, *args)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def imported_modules(path, by_name=False):
    """Every module a file imports, at the top or inside a function; by_name: also every name it may import by a
    string (a literal such as gdro.companion(feature, "reward_ocr") passes to importlib)."""
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if by_name and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            found.add(node.value)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_that_gdro_imports_imports_gdro_back():
    project = {p.stem for p in ROOT.glob("*.py")} | {"experiments"}
    companions = imported_modules(ROOT / "gdro.py", by_name=True) & project
    assert companions == {"families", "reward_ocr", "reward_geneval"}, companions
    for name in companions:
        assert "gdro" not in imported_modules(ROOT / f"{name}.py"), f"{name}.py imports gdro: an import circle"


def test_no_line_of_the_project_s_python_is_over_120_characters():
    files = [f for folder in (ROOT, ROOT / "experiments", ROOT / "tests") for f in sorted(folder.glob("*.py"))]
    long = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1) if len(line) > 120]
    assert len(files) > 10 and not long, long


@pytest.mark.slow
def test_copied_alone_gdro_answers_help_and_dry_run_and_exports_the_method(tmp_path):
    folder = alone(tmp_path)
    assert "--prompts" in run(folder, "gdro.py", "--help") and "--beta" in run(folder, "gdro.py", "--help")
    plan = run(folder, "gdro.py", "--prompts", "prompts.txt", "--reward", "my_reward.py:brightness", "--dry-run")
    assert '"prompts": 2' in plan and '"family": "sd3"' in plan and "est_rollout_gpu_hours_h200" in plan
    flux = run(folder, "gdro.py", "--prompts", "prompts.txt", "--reward", "my_reward.py:brightness", "--dry-run",
               "--model", "black-forest-labs/FLUX.1-dev")
    assert '"family": "flux"' in flux and '"guidance": 3.5' in flux
    assert run(folder, "-c", "from gdro import gdro_loss, velocity_errors, sample_t; print('ok')").strip() == "ok"


@pytest.mark.slow
def test_copied_alone_gdro_says_in_one_line_what_needs_a_companion(tmp_path):
    folder = alone(tmp_path)
    custom = ["--prompts", "prompts.txt", "--reward", "my_reward.py:brightness", "--dry-run"]
    for args, needs in ((custom + ["--tiny"], "--tiny needs families.py"),
                        (["--from-images", ".", "--dry-run"], "--from-images needs families.py"),
                        (["--prompts", "prompts.txt", "--dry-run"], "--reward ocr needs reward_ocr.py"),
                        (custom + ["--quantize", "int8"], "--quantize needs families.py"),
                        (custom + ["--report-to", "tensorboard"], "--report-to needs families.py"),
                        (custom + ["--sampler", "unipc"], "--sampler needs families.py"),
                        (custom + ["--family", "qwen-image"], "--family qwen-image: not a supported family")):
        done = python(folder, "gdro.py", *args)
        assert done.returncode == 2 and needs in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_copied_alone_gdro_trains_a_lora_that_loads_into_the_pipeline(tmp_path, family):
    from diffusers import DiffusionPipeline
    folder = alone(tmp_path)
    families.build_tiny_pipeline(gdro.family_record(family)).save_pretrained(folder / "model")
    out = run(folder, "gdro.py", "--model", "model", "--prompts", "prompts.txt", "--reward", "my_reward.py:brightness",
              "--images-per-prompt", "4", "--group-size", "3", "--steps", "2", "--groups-per-step", "2",
              "--max-steps", "3", "--lora-rank", "4", "--resolution", "64", "--out", "run")
    assert "LoRA saved to run/lora" in out
    pipe = DiffusionPipeline.from_pretrained(folder / "model")
    pipe.set_progress_bar_config(disable=True)
    draw = lambda: pipe("a sign", num_inference_steps=2, height=64, width=64, output_type="latent",
                        generator=torch.Generator().manual_seed(0), guidance_scale=3.5).images
    before = draw()
    pipe.load_lora_weights(folder / "run" / "lora")
    assert not torch.allclose(draw(), before)


@pytest.mark.slow
def test_with_reward_ocr_beside_it_gdro_trains_with_the_ocr_reward(tmp_path):
    folder = alone(tmp_path, "reward_ocr.py")
    families.build_tiny_pipeline(gdro.SD3()).save_pretrained(folder / "model")
    out = run(folder, "gdro.py", "--model", "model", "--prompts", "prompts.txt", "--images-per-prompt", "2",
              "--group-size", "2", "--steps", "1", "--groups-per-step", "1", "--max-steps", "1", "--lora-rank", "4",
              "--out", "run")
    assert "LoRA saved to run/lora" in out and "mean reward" in out
