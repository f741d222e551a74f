"""The scene model (experiments/scene_model.py) and its detector (experiments/scene_detector.py): the prompts are
GenEval's grammar and split by meaning, every render satisfies its prompt under the detector, the detector reads
hand-made images as drawn, and the recipe builds at toy size into a folder that gdro.py trains on."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import reward_geneval
from experiments import scene_detector
from experiments import scene_model as scenes

ROOT = Path(__file__).resolve().parent.parent
TOY = {"variants": 1, "vae_steps": 2, "vae_batch": 4, "steps": 2, "batch": 4, "layers": 1, "train_prompts": 6}


def test_scene_prompts_are_genevals_grammar_and_cover_all_six_tags():
    metas = scenes.scene_metadata()
    assert all(reward_geneval.parse_prompt(m["prompt"]) == m for m in metas)
    counts = {t: sum(m["tag"] == t for m in metas) for t in reward_geneval.TAGS}
    assert counts == {"single_object": 4, "two_object": 12, "counting": 12, "colors": 16, "position": 48,
                      "color_attr": 144}
    assert max(len(m["prompt"]) for m in metas) + 2 <= scenes.SCENE_RECIPE["t5_length"]  # never truncated


def test_splits_share_no_prompt_nor_scene_and_hold_every_tag():
    splits = scenes.scene_splits()
    sets = {k: set(v) for k, v in splits.items()}
    assert sum(map(len, sets.values())) == len(scenes.scene_metadata())
    assert not sets["train"] & sets["test"] and not sets["train"] & sets["val"] and not sets["val"] & sets["test"]
    keys = {k: {scenes.scene_key(reward_geneval.parse_prompt(p)) for p in v} for k, v in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"]  # "X left of Y" = "Y right of X"
    for split in splits.values():
        assert {reward_geneval.parse_prompt(p)["tag"] for p in split} == set(reward_geneval.TAGS)
    assert scenes.scene_splits() == splits  # split once: the same every time


def test_reversed_wording_is_one_scene():
    key = lambda p: scenes.scene_key(reward_geneval.parse_prompt(p))
    assert key("a photo of a clock left of a tv") == key("a photo of a tv right of a clock")
    assert key("a photo of a red clock and a blue tv") == key("a photo of a blue tv and a red clock")
    assert key("a photo of a clock left of a tv") != key("a photo of a clock right of a tv")


def test_every_clean_render_satisfies_its_prompt_under_the_detector():
    rng = random.Random(7)
    for meta in scenes.scene_metadata():
        for _ in range(2):
            image, truth = scenes.render_scene(meta["prompt"], rng)
            found = scene_detector.detect(image)
            assert scenes.contents_match(meta["prompt"], truth, found), (meta["prompt"], truth, found)
            verdict = reward_geneval.explain(meta, found)
            assert verdict["correct"] and verdict["reward"] == 1.0, (meta["prompt"], verdict)


def hand_made(shapes, size=64):
    """A white image with shapes drawn directly at 1x: (kind, box, rgb)."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for kind, box, rgb in shapes:
        if kind == "circle":
            draw.ellipse(box, fill=rgb)
        elif kind == "triangle":
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=rgb)
        else:
            draw.rectangle(box, fill=rgb)
    return img


def test_the_detector_reads_hand_made_shapes_their_colours_and_boxes():
    img = hand_made([("circle", (4, 4, 19, 19), (200, 20, 20)), ("rect", (40, 6, 53, 19), (20, 60, 230)),
                     ("triangle", (6, 40, 24, 56), (240, 220, 0)), ("rect", (34, 44, 60, 52), (20, 150, 40))])
    found = sorted(scene_detector.detect(img), key=lambda d: (d["box"][1] > 30, d["box"][0]))
    assert [(d["label"], d["color"]) for d in found] == [("clock", "red"), ("tv", "blue"), ("kite", "yellow"),
                                                         ("bus", "green")]
    assert found[0]["box"] == [4.0, 4.0, 20.0, 20.0] and found[3]["box"] == [34.0, 44.0, 61.0, 53.0]
    assert all(d["score"] > reward_geneval.COUNTING_THRESHOLD for d in found)
    verdict = reward_geneval.explain("a photo of a red clock and a blue tv", found)
    assert verdict["correct"]
    assert reward_geneval.explain("a photo of a kite below a clock", found)["correct"]
    assert not reward_geneval.explain("a photo of a kite above a clock", found)["correct"]


def test_blank_images_and_specks_have_no_detections_and_a_blob_is_doubtful():
    assert scene_detector.detect(Image.new("RGB", (64, 64), "white")) == []
    assert scene_detector.detect(hand_made([("rect", (30, 30, 33, 33), (0, 0, 0))])) == []  # 16 pixels: a speck
    # a square and a circle run together: one component, far from every prototype, kept for no counting prompt
    blob = scene_detector.detect(hand_made([("rect", (10, 10, 30, 30), (200, 20, 20)),
                                            ("circle", (26, 12, 50, 36), (200, 20, 20))]))
    assert len(blob) == 1 and blob[0]["score"] < reward_geneval.COUNTING_THRESHOLD


def test_the_reward_is_genevals_rules_on_the_detections():
    image, _ = scenes.render_scene("a photo of a red clock and a blue tv", random.Random(0))
    rewards = scene_detector.scene_reward([image] * 3, ["a photo of a red clock and a blue tv",
                                                        "a photo of a red clock and a green tv",
                                                        "a photo of two clocks"])
    assert rewards == [1.0, 0.75, 0.5 * 1 / 2 + 0.5 * 1]  # a tv of the wrong colour; one clock of two (its exclude met)


def test_failures_are_named_by_kind_and_ties_at_the_top_counted():
    assert scenes.failure_kinds("missing cat; colour: red car is blue") == {"missing", "wrong colour"}
    assert scenes.failure_kinds("count 1/2 clock") == {"miscount"}
    assert scenes.failure_kinds("exclude: 3 clocks") == {"miscount"}
    assert scenes.failure_kinds("position: clock not left of tv") == {"wrong relation"}
    verdicts = [{"tag": "colors", "correct": r == 1, "reward": r, "failed": "" if r == 1 else "colour: x"}
                for r in (1, 1, 0.5, 0.5, 0.5, 0.5, 1, 0.5, 0.5, 0.5, 0.5, 0.5)]
    figures = scenes.summarize(verdicts, n=12, group=6)
    assert figures["groups"] == 2 and figures["tied_at_top"] == 0.5 and figures["all_tied"] == 0.0
    assert figures["tags"]["colors"]["accuracy"] == 0.25 and figures["geneval_score"] == 0.25


def run_script(*argv):
    return subprocess.run([sys.executable, "-m", "experiments.scene_model", *argv], cwd=ROOT, capture_output=True,
                          text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})


@pytest.mark.slow
def test_refusals_are_one_line_with_exit_2(tmp_path):
    for argv, says in ((["--set", "steps=0"], "steps=0: must be at least 1"),
                       (["--set", "t5_length=32"], "at least 44"),
                       (["--base-on-val", "--out", str(tmp_path)], "holds no scene model")):
        done = run_script(*argv)
        assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done


@pytest.fixture(scope="module")
def scene_model(tmp_path_factory):
    return scenes.build_scene_model(tmp_path_factory.mktemp("scene_model"), TOY)


@pytest.mark.slow
def test_the_toy_recipe_builds_a_folder_from_pretrained_loads_with_its_splits(scene_model):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
    pipe = DiffusionPipeline.from_pretrained(scene_model)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.tokenizer_3.model_max_length == 48
    files = {s: (scene_model / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    assert files == scenes.scene_splits()
    record = json.loads((scene_model / "scene_model.json").read_text())
    assert record["record"] == scenes.model_record(TOY) and record["transformer_steps_per_s"] > 0
    assert scenes.build_scene_model(scene_model, TOY) == scene_model  # built once, then reused
    assert not (scene_model / "build").exists()


@pytest.mark.slow
def test_gdro_trains_on_the_toy_scene_model_with_the_scene_reward(scene_model, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "gdro.py", "--model", str(scene_model), "--reward",
           "experiments/scene_detector.py:scene_reward", "--prompts", str(scene_model / "train.txt"),
           "--max-prompts", "2", "--images-per-prompt", "4", "--group-size", "2", "--steps", "2", "--max-steps", "2",
           "--groups-per-step", "2", "--lora-rank", "4", "--log-every", "1", "--beta", "6", "--gamma", "1.0",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "cache" / "manifest.json").read_text())["resolution"] == 64
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_paired_gains_per_tag_and_the_geneval_scores_se_from_pooled_prompt_spread():
    from experiments import scene_gdro
    verdict = lambda tag, correct: {"tag": tag, "correct": correct, "reward": float(correct),
                                    "detections": [{"label": "clock"}] * correct}  # one object where correct
    # prompt 0 single_object, prompts 1-2 colors; two images each, the same seeds for base and LoRA
    base = {0: [verdict("single_object", 0)] * 2, 1: [verdict("colors", 0)] * 2,
            2: [verdict("colors", 1), verdict("colors", 0)]}
    lora = {0: [verdict("single_object", 1)] * 2, 1: [verdict("colors", 1), verdict("colors", 0)],
            2: [verdict("colors", 1)] * 2}
    r = scene_gdro.paired_gain({"base": base, "lora": lora}, "lora")
    assert r["base"]["geneval_score"] == 0.125 and r["lora"]["geneval_score"] == 0.875  # (0 + 1/4) / 2, (1 + 3/4) / 2
    assert r["tags"]["colors"] == {"gain": 0.5, "se": 0.0, "prompts": 2} and r["tags"]["single_object"]["gain"] == 1
    assert r["geneval_gain"] == 0.75 and r["geneval_gain_se"] == 0.0  # no spread within any tag
    assert r["prompts_improved"] == 1.0 and abs(r["reward_gain"] - 2 / 3) < 1e-12  # per prompt: 1, 1/2, 1/2
    assert r["base"]["objects_per_image"] == 1 / 6 and r["lora"]["objects_per_image"] == 5 / 6


def test_shapes_drawn_a_little_off_still_read_as_the_nearest_class():
    # a circle 20 % wider than high (as models draw them) is a clock; a 3:2 box, nearer a square than a bar, a tv
    wide = scene_detector.detect(hand_made([("circle", (10, 10, 28, 25), (200, 20, 20))]))
    assert [d["label"] for d in wide] == ["clock"] and wide[0]["score"] > reward_geneval.COUNTING_THRESHOLD
    box = scene_detector.detect(hand_made([("rect", (10, 10, 34, 26), (20, 60, 230))]))
    assert [d["label"] for d in box] == ["tv"] and box[0]["score"] > reward_geneval.COUNTING_THRESHOLD


def fake_eval(folder, prompts, images):
    """An eval.py output folder as scene_gdro reads it: images/SET/PPPP_J.png and scores.jsonl, rows out of order."""
    rows = []
    for name, draws in images.items():
        (folder / "images" / name).mkdir(parents=True, exist_ok=True)
        for i, per_prompt in enumerate(draws):
            for j, shapes in enumerate(per_prompt):
                hand_made(shapes).save(folder / "images" / name / f"{i:04d}_{j}.png")
                rows.append({"set": name, "prompt_index": i, "seed": 100 + j, "prompt": prompts[i],
                             "image": f"images/{name}/{i:04d}_{j}.png"})
    (folder / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))


def test_the_grid_shows_each_prompts_first_seed_with_its_verdict_in_a_palette_image_under_300_kb(tmp_path):
    from experiments import scene_gdro
    prompts = ["a photo of a clock", "a photo of a red tv"]
    clock, red_tv = ("circle", (20, 20, 36, 36), (20, 60, 230)), ("rect", (20, 20, 36, 36), (200, 20, 20))
    fake_eval(tmp_path / "eval", prompts, {"base": [[(), (clock,)], [(), ()]],  # the first seed: nothing drawn
                                           "lora": [[(clock,), ()], [(red_tv,), ()]]})
    (tmp_path / "test.txt").write_text("\n".join(prompts) + "\n")
    found = scene_gdro.verdicts(tmp_path / "eval")  # in seed order, whatever the file's order
    assert [v["correct"] for v in found["base"][0]] == [False, True] and found["lora"][1][0]["correct"]
    scene_gdro.draw_grid(tmp_path / "grid.png", tmp_path / "eval", found, tmp_path / "test.txt", 2, 75)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.mode == "P" and grid.height > 2 * 256  # a row a prompt
    assert (tmp_path / "grid.png").stat().st_size < 300_000


def test_a_rerun_skips_an_evaluation_that_wrote_its_report(tmp_path):
    from experiments import scene_gdro
    cmd = lambda: scene_gdro.eval_command("m", "p.txt", ["l"], tmp_path / "eval", scene_gdro.GDRO, 4)
    assert cmd() is not None
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text("{}")
    assert cmd() is None and scene_gdro.todo([[["train"], cmd()], [cmd()]]) == [[["train"]], []]
