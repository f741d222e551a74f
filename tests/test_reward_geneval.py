"""Specification of the GenEval reward (reward_geneval.py) and of its prompt sets (geneval.txt, geneval_test.txt).

The rules run on hand-made detections, each answer worked out by hand in the test; the detector and colour path
runs on a tiny random Mask2Former and a tiny CLIP built from configs (the real classes and post-processing)."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import families
import gdro
import reward_geneval as rg
from experiments import geneval_prompts

HERE = Path(__file__).resolve().parent.parent  # the repository


def det(label, score=0.95, box=(0, 0, 10, 10), color=None):
    return {"label": label, "score": score, "box": list(box), "color": color}


def lines(name):
    return (HERE / name).read_text(encoding="utf-8").splitlines()


# ---- the prompt grammar ----

def test_each_tag_parses_to_genevals_metadata_layout():
    assert rg.parse_prompt("a photo of an apple") == {
        "tag": "single_object", "include": [{"class": "apple", "count": 1}], "prompt": "a photo of an apple"}
    assert rg.parse_prompt("a photo of a tv remote and an oven")["include"] == [
        {"class": "tv remote", "count": 1}, {"class": "oven", "count": 1}]
    assert rg.parse_prompt("a photo of three buses") == {
        "tag": "counting", "include": [{"class": "bus", "count": 3}], "exclude": [{"class": "bus", "count": 4}],
        "prompt": "a photo of three buses"}
    assert rg.parse_prompt("a photo of an orange orange")["include"] == [{"class": "orange", "count": 1,
                                                                          "color": "orange"}]
    # position: the target (Y) first, then X with (relation, the target's index)
    assert rg.parse_prompt("a photo of a dog left of a hair drier")["include"] == [
        {"class": "hair drier", "count": 1}, {"class": "dog", "count": 1, "position": ("left of", 0)}]
    assert rg.parse_prompt("a photo of a red car and an orange cat") == {
        "tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                         {"class": "cat", "count": 1, "color": "orange"}],
        "prompt": "a photo of a red car and an orange cat"}


def test_plural_adds_es_after_a_final_s_as_geneval_does():
    assert rg.parse_prompt("a photo of two skises")["include"][0]["class"] == "skis"
    assert rg.parse_prompt("a photo of four sheeps")["include"][0]["class"] == "sheep"
    with pytest.raises(ValueError, match="plural"):
        rg.parse_prompt("a photo of two skis")


@pytest.mark.parametrize("prompt, reason", [
    ("a picture of a dog", "start with"),
    ("a photo of a dogg", "not one of the 80"),
    ("a photo of an dog", "writes 'a'"),
    ("a photo of a apple", "writes 'an'"),
    ("a photo of a red person", "never colours a person"),
    ("a photo of a purple unicorn", "not one of the 80"),
    ("a photo of five dogs", "expected 'a' or 'an'"),
    ("a photo of two dog", "plural"),
    ("a photo of a dog and a dog", "two different objects"),
    ("a photo of a red dog and a cat", "both coloured or neither"),
    ("a photo of a dog and a cat and a bird", "at most two"),
    ("a photo of a red dog left of a cat", "uncoloured"),
    ("a photo of a dog left of a dog", "two different objects"),
    ("A photo of a dog", "start with"),
    ("", "start with"),
])
def test_malformed_prompts_are_refused_with_the_reason(prompt, reason):
    with pytest.raises(ValueError, match=reason):
        rg.parse_prompt(prompt)


def test_check_prompts_names_the_index_and_reason_of_each_bad_prompt():
    bad = rg.check_prompts(["a photo of a dog", "a photo of a dogg", "a photo of two cats", "a dog"])
    assert [i for i, _ in bad] == [1, 3]
    assert "dogg" in bad[0][1] and "start with" in bad[1][1]


def test_a_prompt_file_s_first_bad_line_is_named_by_its_number_with_the_count_of_the_others():
    lines = [(1, "a photo of a dog"), (4, "a photo of a dogg"), (7, "a dog"), (9, "a photo of a cat")]
    fault = rg.bad_prompt_lines(lines)
    assert fault.startswith("line 4 is not a GenEval prompt (") and "dogg" in fault
    assert fault.endswith("; 1 more lines too")
    assert rg.bad_prompt_lines(lines[:1] + lines[3:]) is None


def test_every_prompt_of_both_files_round_trips_through_parse_prompt():
    for name in ("geneval.txt", "geneval_test.txt"):
        for line in lines(name):
            meta = rg.parse_prompt(line)
            assert rg.prompt_of(meta) == line and meta["prompt"] == line


# ---- the prompt files ----

def test_test_set_has_the_benchmarks_proportions_and_no_coloured_person():
    metas = [rg.parse_prompt(line) for line in lines("geneval_test.txt")]
    counts = {tag: sum(m["tag"] == tag for m in metas) for tag in rg.TAGS}
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    assert len(set(lines("geneval_test.txt"))) == 553
    assert not any(r["class"] == "person" and "color" in r for m in metas for r in m["include"])


def test_training_set_balances_five_tags_and_shares_no_prompt_with_the_test_set_in_either_order():
    train = [rg.parse_prompt(line) for line in lines("geneval.txt")]
    counts = {tag: sum(m["tag"] == tag for m in train) for tag in rg.TAGS}
    # every single-object prompt is in the test set, so training has none
    assert counts == {"single_object": 0, **{tag: geneval_prompts.PER_TAG for tag in rg.TAGS[1:]}}
    test_keys = {geneval_prompts.same_prompt_key(rg.parse_prompt(line)) for line in lines("geneval_test.txt")}
    assert not test_keys & {geneval_prompts.same_prompt_key(m) for m in train}
    # the key ignores order: "a cat right of a dog" is the same prompt as "a dog below a cat"
    key = geneval_prompts.same_prompt_key
    assert key(rg.parse_prompt("a photo of a cat right of a dog")) == key(rg.parse_prompt("a photo of a dog below "
                                                                                          "a cat"))
    assert key(rg.parse_prompt("a photo of a red car and a blue cat")) == key(rg.parse_prompt(
        "a photo of a blue cat and a red car"))


def test_committed_files_are_what_the_seeded_recipe_makes():
    sets = geneval_prompts.prompt_sets()
    assert sets["test"] == lines("geneval_test.txt") and sets["train"] == lines("geneval.txt")


# ---- the rules on hand-made detections ----

def test_single_object_is_met_by_one_detection_above_0_3():
    assert rg.score_detections("a photo of a dog", [det("dog", 0.5)]) == (True, 1.0)
    assert rg.score_detections("a photo of a dog", [det("cat", 0.99)]) == (False, 0.0)


def test_threshold_is_strictly_above_0_3_outside_counting():
    # GenEval's code keeps scores > 0.3: exactly 0.3 is dropped
    assert rg.score_detections("a photo of a dog", [det("dog", 0.3)]) == (False, 0.0)
    assert rg.score_detections("a photo of a dog", [det("dog", 0.31)]) == (True, 1.0)


def test_two_object_with_one_missing_scores_half():
    verdict = rg.explain("a photo of a dog and a cat", [det("dog")])
    assert (verdict["correct"], verdict["reward"], verdict["failed"]) == (False, 0.5, "missing cat")


def test_counting_keeps_only_detections_above_0_9():
    apples = [det("apple", 0.95), det("apple", 0.92), det("apple", 0.85)]  # the third does not count
    verdict = rg.explain("a photo of three apples", apples)
    # checks: count 2/3 of 3, exclude (< 4 apples) holds -> (2/3 + 1) / 2 = 5/6
    assert verdict["correct"] is False and verdict["reward"] == pytest.approx(5 / 6)
    assert verdict["failed"] == "count 2/3 apple"
    # the same 0.85 apple counts for a prompt that is not counting
    assert rg.score_detections("a photo of an apple", apples[2:]) == (True, 1.0)


def test_counting_exclude_fails_one_object_too_many_and_ignores_unsure_ones():
    four = [det("apple", 0.95 - i / 100) for i in range(4)]
    verdict = rg.explain("a photo of three apples", four)
    # count met (1), exclude 4 apples kept >= 4 fails (0) -> 1/2
    assert (verdict["correct"], verdict["reward"], verdict["failed"]) == (False, 0.5, "exclude: 4 apples")
    # a fourth apple at 0.6 is below the counting threshold: it neither counts nor fails the exclude
    assert rg.score_detections("a photo of three apples", four[:3] + [det("apple", 0.6)]) == (True, 1.0)


def test_at_most_16_detections_per_class_highest_first():
    people = [det("person", 0.31 + i / 100) for i in range(20)]  # 0.31 ... 0.50
    kept = rg.explain("a photo of a person", people)["detections"]
    assert len(kept) == 16
    assert [d["score"] for d in kept] == pytest.approx([0.50 - i / 100 for i in range(16)])


def test_colour_is_checked_on_the_top_object_only():
    cars = [det("car", 0.9, color="blue"), det("car", 0.8, color="red")]  # a red car exists, but not on top
    verdict = rg.explain("a photo of a red car", cars)
    # checks: count 1/1, colour 0/1 -> 1/2
    assert (verdict["correct"], verdict["reward"], verdict["failed"]) == (False, 0.5, "colour: red car is blue")
    assert rg.score_detections("a photo of a red car", cars[::-1]) == (False, 0.5)  # order given does not matter
    assert rg.score_detections("a photo of a red car", [det("car", 0.9, color="red")]) == (True, 1.0)


def test_colour_must_hold_for_every_counted_object():
    # GenEval's prompts colour one object; its rule colours each of the include's top `count` objects
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}], "prompt": "(hand-made)"}
    verdict = rg.explain(meta, [det("car", 0.9, color="red"), det("car", 0.8, color="blue"),
                                det("car", 0.7, color="red")])
    # count 2/2 (1), colour: 1 of the top 2 red (1/2) -> 3/4; the third red car is not among the top 2
    assert (verdict["correct"], verdict["reward"]) == (False, 0.75)


def test_color_attr_scores_each_objects_count_and_colour():
    dets = [det("car", color="red"), det("cat", color="green")]
    verdict = rg.explain("a photo of a red car and a blue cat", dets)
    # checks: car 1, red 1, cat 1, blue 0 -> 3/4
    assert (verdict["correct"], verdict["reward"], verdict["failed"]) == (False, 0.75, "colour: blue cat is green")


def test_relation_directions_in_image_coordinates():
    assert rg.relation([0, 0, 10, 10], [30, 0, 40, 10]) == {"left of"}
    assert rg.relation([30, 0, 40, 10], [0, 0, 10, 10]) == {"right of"}
    assert rg.relation([0, 0, 10, 10], [0, 30, 10, 40]) == {"above"}  # y grows downwards
    assert rg.relation([0, 30, 10, 40], [0, 0, 10, 10]) == {"below"}
    assert rg.relation([0, 0, 10, 10], [30, 30, 40, 40]) == {"left of", "above"}  # dx = dy = -(30 - 2) / 42.4 = -0.66
    assert rg.relation([0, 0, 10, 10], [0, 0, 10, 10]) == set()


def test_position_is_met_when_x_stands_in_the_relation_to_y():
    dets = [det("dog", box=(0, 0, 10, 10)), det("cat", box=(30, 0, 40, 10))]
    assert rg.score_detections("a photo of a dog left of a cat", dets) == (True, 1.0)
    verdict = rg.explain("a photo of a dog right of a cat", dets)
    # checks: cat 1, dog 1, position 0 -> 2/3
    assert (verdict["correct"], verdict["failed"]) == (False, "position: dog not right of cat")
    assert verdict["reward"] == pytest.approx(2 / 3)


def test_position_margin_takes_a_tenth_of_the_summed_sides_off_the_offset():
    # centres (50, 50) and (80, 70): offset (-30, -20), |offset| = 36.06. Without the margin dx = -30 / 36.06 = -0.83
    # (left of). Summed sides (150, 40) -> margins (15, 4): shrunk (-15, -16), dx = -0.42, dy = -0.44: no relation.
    dog, cat = (12.5, 40, 87.5, 60), (42.5, 60, 117.5, 80)
    assert rg.relation(dog, cat) == set()
    verdict = rg.explain("a photo of a dog left of a cat", [det("dog", box=dog), det("cat", box=cat)])
    assert verdict["correct"] is False and verdict["reward"] == pytest.approx(2 / 3)
    # narrower boxes, the same centres: sides (30, 40) -> shrunk (-27, -16), dx = -0.75: left of
    assert rg.relation((35, 40, 65, 60), (65, 60, 95, 80)) == {"left of"}


def test_position_needs_the_target_include_met():
    verdict = rg.explain("a photo of a dog left of a cat", [det("dog", box=(0, 0, 10, 10))])
    # checks: cat 0, dog 1, position 0 (no cat to stand left of) -> 1/3; only the cause is named
    assert (verdict["correct"], verdict["failed"]) == (False, "missing cat")
    assert verdict["reward"] == pytest.approx(1 / 3)


def test_position_holds_against_every_top_object_of_the_target_and_ignores_the_others():
    meta = {"tag": "position", "prompt": "(hand-made)", "include": [
        {"class": "cat", "count": 2}, {"class": "dog", "count": 1, "position": ("left of", 0)}]}
    dog, left_cat = det("dog", box=(30, 0, 40, 10)), det("cat", box=(0, 0, 10, 10))
    right_cat = det("cat", 0.9, box=(60, 0, 70, 10))
    # the dog is left of one of the two target cats only: cat 1, dog 1, position 0 -> 2/3
    assert rg.score_detections(meta, [dog, left_cat, right_cat]) == (False, pytest.approx(2 / 3))
    # GenEval's prompt: target count 1, the top cat (0.95, right of the dog) decides; a cat at 0.5 on the left
    # is not the top one
    dets = [dog, det("cat", 0.95, box=(60, 0, 70, 10)), det("cat", 0.5, box=(0, 0, 10, 10))]
    assert rg.score_detections("a photo of a dog left of a cat", dets) == (True, 1.0)


def test_reward_is_one_exactly_when_correct_on_random_detections():
    rnd = random.Random(0)
    prompts = lines("geneval_test.txt")
    for _ in range(3000):
        prompt = rnd.choice(prompts)
        classes = [r["class"] for r in rg.parse_prompt(prompt)["include"]] + ["dog"]
        dets = []
        for _ in range(rnd.randint(0, 6)):
            x, y = rnd.uniform(0, 400), rnd.uniform(0, 400)
            dets.append(det(rnd.choice(classes), rnd.uniform(0.2, 1.0), (x, y, x + rnd.uniform(5, 100),
                                                                          y + rnd.uniform(5, 100)),
                            rnd.choice([*rg.COLORS[:3], None])))
        correct, reward = rg.score_detections(prompt, dets)
        assert 0 <= reward <= 1 and correct == (reward == 1)


# ---- the detector and colour path on tiny models (slow: importing transformers' models takes seconds) ----

COCO_DETECTOR_NAMES = [{"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(c, c)
                       for c in rg.COCO_CLASSES]  # how COCO detector configs name them


def test_mask_boxes_are_the_pixel_edges_of_each_mask():
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True           # rows 2-4, columns 3-8
    masks[1, 10, 29] = True             # one pixel in the last column
    assert rg.mask_boxes(masks).tolist() == [[3, 2, 9, 5], [29, 10, 30, 11], [0, 0, 0, 0]]


def test_detector_labels_map_to_genevals_class_names():
    classes = rg.detector_classes(dict(enumerate(COCO_DETECTOR_NAMES + ["sky-other-merged"])))
    assert classes[64] == "computer mouse" and classes[65] == "tv remote" and classes[0] == "person"
    assert classes[80] is None  # not one of the 80: never a detection
    with pytest.raises(ValueError, match="not COCO's 80"):
        rg.detector_classes({0: "person", 1: "dog"})


def test_colour_crop_pastes_the_mask_on_grey_and_crops_to_the_box():
    image = Image.new("RGB", (8, 6), (255, 0, 0))
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:5] = True
    mask[1, 2] = False
    crop = np.asarray(rg.colour_crop(image, mask, [2, 1, 5, 4]))
    assert crop.shape == (3, 3, 3)
    assert crop[0, 0].tolist() == [153, 153, 153] and crop[1, 1].tolist() == [255, 0, 0]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """(detector, clip): a random Mask2Former (tiny Swin) and a random CLIP (a character vocabulary), saved with
    save_pretrained as a user's local copies would be (what --tiny --reward geneval uses)."""
    return families.save_tiny_geneval_models(tmp_path_factory.mktemp("geneval_models"))


@pytest.fixture(scope="module")
def tiny(tiny_folders):
    return rg.GenevalReward(*tiny_folders, device="cpu", batch=2, side=64)


def forced_output(model, queries):
    """A forward hook that replaces the detector's output with chosen queries: (class id, mask logits rectangle on
    the 16 x 16 grid of a 64-pixel input: rows, columns); every other query says "no object"."""
    def hook(module, args, kwargs, out):
        n, q = out.class_queries_logits.shape[:2]
        logits = torch.full_like(out.class_queries_logits, -20.0)
        logits[..., -1] = 20.0  # the last class is "no object"
        masks = torch.full_like(out.masks_queries_logits, -20.0)
        for i, (label, rows, cols) in enumerate(queries):
            logits[:, i, -1], logits[:, i, label] = -20.0, 20.0
            masks[:, i, rows, cols] = 20.0
        out.class_queries_logits, out.masks_queries_logits = logits, masks
        return out
    return model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.slow
def test_tiny_models_give_one_reward_in_0_1_per_image(tiny):
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), np.zeros((48, 64, 3), dtype=np.uint8)]
    rewards = tiny(images, ["a photo of a red car", "a photo of two dogs"])
    assert len(rewards) == 2 and all(isinstance(r, float) and 0 <= r <= 1 for r in rewards)


@pytest.mark.slow
def test_forced_detections_run_the_real_post_processing_into_boxes_from_masks(tiny):
    dog, cat = rg.COCO_CLASSES.index("dog"), rg.COCO_CLASSES.index("cat")
    # 16 x 16 mask logits for a 64 x 64 input and image: each cell is 4 x 4 pixels
    handle = forced_output(tiny.detector, [(dog, slice(4, 8), slice(0, 4)), (cat, slice(4, 8), slice(10, 16))])
    try:
        image = Image.new("RGB", (64, 64), (40, 200, 40))
        [position, colour] = tiny.evaluate([image, image], ["a photo of a dog left of a cat", "a photo of a red dog"])
    finally:
        handle.remove()
    boxes = {d["label"]: d["box"] for d in position["detections"]}
    assert boxes["dog"] == pytest.approx([0, 16, 16, 32], abs=1) and boxes["cat"] == pytest.approx([40, 16, 64, 32],
                                                                                                   abs=1)
    assert all(0.3 < d["score"] <= 1 and d["color"] is None for d in position["detections"])
    assert (position["correct"], position["reward"], position["tag"]) == (True, 1.0, "position")
    # colour is named (by the random CLIP: any of the ten) for the checked object only
    named = {d["label"]: d["color"] for d in colour["detections"]}
    assert named["dog"] in rg.COLORS and named["cat"] is None
    assert colour["reward"] == (1.0 if named["dog"] == "red" else 0.5)


@pytest.mark.slow
def test_missing_weights_stop_in_one_line_naming_the_source_and_the_flag(tmp_path):
    absent = str(tmp_path / "no-such-detector")
    with pytest.raises(SystemExit) as stop:
        rg.GenevalReward(detector=absent, device="cpu")
    message = str(stop.value.code)
    assert "\n" not in message and absent in message and "--geneval-detector" in message


def test_cli_refuses_a_prompt_outside_the_grammar_in_one_line_with_exit_2(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    with pytest.raises(SystemExit) as stop:
        rg.main([str(tmp_path / "0.png"), "a photo of a dogg"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err and "dogg" in err


@pytest.mark.slow
def test_eval_scores_a_folder_per_tag_with_local_models(tiny_folders, tmp_path, capsys):
    import eval as evaluate
    (tmp_path / "p.txt").write_text("a photo of a dog\na photo of two cats\n")
    (tmp_path / "images").mkdir()
    for i in range(4):  # two images per prompt, in name order
        Image.new("RGB", (48, 48), (i * 60, 90, 90)).save(tmp_path / "images" / f"{i}.png")
    report = evaluate.main(["--images", str(tmp_path / "images"), "--prompts", str(tmp_path / "p.txt"),
                            "--reward", "geneval", "--geneval-detector", tiny_folders[0], "--geneval-clip",
                            tiny_folders[1], "--images-per-prompt", "2", "--judge", "none",
                            "--out", str(tmp_path / "e")])
    tags = report["images"]["tag_accuracy"]
    assert tags["single_object"] == 0.0 and tags["counting"] == 0.0 and tags["colors"] is None
    assert report["images"]["geneval_score"] == 0.0 and "GenEval" in capsys.readouterr().out


# ---- --reward geneval in gdro.py and eval.py ----

ONE_PER_TAG = ["a photo of a bench", "a photo of a dog and a cat", "a photo of three apples", "a photo of a red car",
               "a photo of a dog left of a cat", "a photo of a red car and a blue bus"]  # in TAGS' order


def test_a_prompts_file_outside_genevals_grammar_is_refused_naming_the_line_before_anything_loads(tmp_path):
    (tmp_path / "p.txt").write_text("a photo of a dog\n\na photo of a dogg\n")
    with pytest.raises(gdro.BadInput, match=r"p.txt: line 3 is not a GenEval prompt .*dogg"):
        gdro.main(["--prompts", str(tmp_path / "p.txt"), "--reward", "geneval", "--dry-run"])


@pytest.mark.slow
def test_a_tiny_gdro_run_with_the_geneval_reward_trains_and_writes_its_lora(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(ONE_PER_TAG[:4]) + "\n")
    lora = gdro.main(["--prompts", str(tmp_path / "p.txt"), "--tiny", "--reward", "geneval", "--beta", "6",
                      "--gamma", "1.0", "--out", str(tmp_path / "run"), "--max-steps", "4", "--log-every", "2"])
    assert (lora / gdro.LORA_FILE).is_file()
    manifest = json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())
    assert manifest["reward"] == "geneval" and manifest["reward_sha256"] == gdro.file_sha256(HERE / "reward_geneval.py")
    rewards = gdro.read_shard(tmp_path / "run" / "cache", 0)["rewards"]
    assert len(rewards) == 8 and all(0 <= r <= 1 for r in rewards.tolist())


@pytest.mark.slow
def test_eval_with_the_geneval_reward_reports_each_tag_and_the_score_as_their_mean(tmp_path, capsys):
    import eval as evaluate
    (tmp_path / "p.txt").write_text("\n".join(ONE_PER_TAG) + "\n")
    report = evaluate.main(["--prompts", str(tmp_path / "p.txt"), "--tiny", "--reward", "geneval", "--judge", "none",
                            "--out", str(tmp_path / "eval"), "--images-per-prompt", "2", "--max-prompts", "6"])
    base = report["base"]
    assert list(base["tag_accuracy"]) == list(rg.TAGS) and base["n_images"] == 12
    assert base["geneval_score"] == pytest.approx(sum(base["tag_accuracy"].values()) / 6)
    table = capsys.readouterr().out
    assert "GenEval" in table and "color_att" in table
    rows = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert {r["tag"] for r in rows} == set(rg.TAGS) and all({"correct", "failed", "detections"} <= set(r) for r in rows)
    assert Image.open(tmp_path / "eval" / "grid.png").size[0] > 256
