"""Specification of the OCR reward (reward_ocr.py) and of the OCR prompt sets (ocr.txt, ocr_test.txt)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from reward_ocr import OcrReward, bad_prompt_lines, ocr_score, ocr_target, selfcheck

HERE = Path(__file__).resolve().parent.parent  # the repository


def render(text, size=64):
    """Big dark text centred on a white 512x512 image (Pillow's bundled font)."""
    img = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(img).text((256, 256), text, font=ImageFont.load_default(size=size), fill=(20, 20, 20), anchor="mm")
    return img


def blank():
    return Image.new("RGB", (512, 512), "white")


def prompt_lines(name):
    return (HERE / name).read_text(encoding="utf-8").splitlines()


def normalised(text):
    return "".join(text.lower().split())


@pytest.fixture(scope="module")
def ocr():
    return OcrReward()  # one EasyOCR reader for the whole module (loading takes seconds)


# ---- the reward on real EasyOCR output ----

@pytest.mark.slow
def test_exactly_rendered_target_scores_one(ocr):
    assert ocr([render("Fresh Bread")], ['A bakery sign that reads "Fresh Bread"']) == [1.0]


@pytest.mark.slow
def test_one_wrong_letter_scores_one_minus_one_over_target_length(ocr):
    # "Fresh Braad" vs "Fresh Bread": one substitution, 10 characters without the space.
    [reward] = ocr([render("Fresh Braad")], ['A bakery sign that reads "Fresh Bread"'])
    assert reward == pytest.approx(1 - 1 / 10)


@pytest.mark.slow
def test_blank_image_scores_zero(ocr):
    assert ocr([blank()], ['A sign that reads "Fresh Bread"']) == [0.0]


@pytest.mark.slow
def test_batch_takes_pil_images_and_uint8_arrays_in_order(ocr):
    images = [np.asarray(render("Coffee Shop")), blank()]
    assert images[0].dtype == np.uint8 and images[0].shape == (512, 512, 3)
    assert ocr(images, ['A mug that says "Coffee Shop"', 'A mug that says "Coffee Shop"']) == [1.0, 0.0]


@pytest.mark.slow
def test_image_on_which_ocr_fails_scores_zero_with_a_warning_and_the_batch_goes_on(ocr, monkeypatch):
    calls = []

    def flaky_read(image):
        calls.append(image)
        if len(calls) == 1:
            raise RuntimeError("simulated OCR crash")
        return "Open Late"

    monkeypatch.setattr(ocr, "read", flaky_read)
    with pytest.warns(UserWarning, match="OCR failed on image 0"):
        rewards = ocr([blank(), blank()], ['"Open Late"', '"Open Late"'])
    assert rewards == [0.0, 1.0]


@pytest.mark.slow
def test_recognised_text_is_all_pieces_joined_without_separator(ocr):
    assert normalised(ocr.read(render("Welcome Home"))) == "welcomehome"


@pytest.mark.slow
def test_clean_renderings_of_test_targets_score_high_and_mismatched_targets_low(ocr):
    # The benchmark-size check is selfcheck(prompts, n=50);
    # 5 images keep this test fast.
    matched, mismatched = selfcheck(prompt_lines("ocr_test.txt"), n=5, reward=ocr)
    assert matched >= 0.9
    assert mismatched <= 0.3


# ---- the target inside the prompt ----

def test_target_is_text_inside_first_pair_of_double_quotes():
    assert ocr_target('A neon sign "Open Late" next to a door marked "Staff"') == "Open Late"


def test_a_prompt_file_s_lines_without_a_quoted_target_are_named_by_their_numbers():
    lines = [(1, 'a sign "OPEN"'), (3, "a sign"), (4, 'a mug "" on a desk'), (6, "a \u201cCLOSED\u201d sign")]
    assert bad_prompt_lines(lines) == "line(s) 3, 4 have no quoted text for the OCR reward"
    assert bad_prompt_lines(lines[:1] + lines[3:]) is None


def test_curly_quotes_work():
    assert ocr_target("A chalkboard that says \u201cSoup of the Day\u201d, close-up") == "Soup of the Day"


@pytest.mark.slow
def test_prompt_without_quotes_raises_value_error_naming_the_prompt(ocr):
    with pytest.raises(ValueError, match="A sign with no target"):
        ocr_target("A sign with no target")
    with pytest.raises(ValueError):
        ocr([blank()], ["A sign with no target"])


# ---- the scoring rule on hand-made cases ----

def test_target_as_substring_of_recognised_text_is_perfect():
    assert ocr_score("WELCOME to Fresh Bread bakery", "Fresh Bread") == 1.0


def test_case_and_whitespace_are_ignored():
    assert ocr_score("fresh\tb r e a d\n", "FRESH BREAD") == 1.0


def test_known_levenshtein_distance():
    assert ocr_score("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # kitten -> sitting: 3 edits


def test_distance_is_capped_at_target_length_so_reward_never_goes_negative():
    assert ocr_score("a very long unrelated recognised text", "Cat") == 0.0
    assert ocr_score("", "Cat") == 0.0


def test_empty_target_raises_value_error():
    with pytest.raises(ValueError):
        ocr_score("anything", " \t ")


# ---- the prompt sets ----

@pytest.mark.parametrize("name, minimum", [("ocr.txt", 1000), ("ocr_test.txt", 200)])
def test_prompt_file_has_enough_unique_lines_each_with_one_quoted_target_within_length_rules(name, minimum):
    lines = prompt_lines(name)
    assert len(lines) >= minimum
    assert len(set(lines)) == len(lines), "duplicate lines"
    for i, line in enumerate(lines, 1):
        assert line.count('"') == 2, f"{name} line {i}: not exactly one quoted target"
        target = ocr_target(line)
        assert 1 <= len(target.split()) <= 5, f"{name} line {i}: {target!r} is not 1-5 words"
        assert 2 <= len(normalised(target)) <= 27, f"{name} line {i}: {target!r} is not 2-27 characters"


def test_test_targets_never_occur_among_training_targets():
    train = {normalised(ocr_target(p)) for p in prompt_lines("ocr.txt")}
    test = {normalised(ocr_target(p)) for p in prompt_lines("ocr_test.txt")}
    assert not train & test


# ---- the command line ----

def run_cli(*args):
    return subprocess.run([sys.executable, str(HERE / "reward_ocr.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def run_eval(*args):
    return subprocess.run([sys.executable, str(HERE / "eval.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=HERE)


@pytest.mark.slow
def test_eval_scores_a_folder_of_images_in_natural_name_order(tmp_path):
    # A folder of images made elsewhere, scored without a model: "2.png" pairs with prompt line 1, "10.png" with 2
    import eval as evaluate
    (tmp_path / "images").mkdir()
    render("Fresh Bread").save(tmp_path / "images" / "2.png")
    blank().save(tmp_path / "images" / "10.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('A sign that reads "Fresh Bread"\nA sign that reads "Open Late"\n')
    report = evaluate.main(["--images", str(tmp_path / "images"), "--prompts", str(prompts), "--judge", "none",
                            "--out", str(tmp_path / "eval")])
    assert report["images"]["ocr_reward"] == pytest.approx(0.5) and report["images"]["n_images"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing image", "count mismatch", "prompt line without quotes"])
def test_bad_input_exits_2_with_one_line_error_and_no_traceback(tmp_path, case):
    blank().save(tmp_path / "0.png")
    prompts = tmp_path / "prompts.txt"
    folder = ["--images", tmp_path, "--prompts", prompts, "--judge", "none", "--out", tmp_path / "eval"]
    if case == "missing image":
        result, expected = run_cli(tmp_path / "nope.png", 'A sign "Hi there"'), "nope.png"
    elif case == "count mismatch":
        prompts.write_text('A sign "One"\nA sign "Two"\n')
        result, expected = run_eval(*folder), "2 prompt lines"
    else:
        prompts.write_text("A sign with no target\n")
        result, expected = run_eval(*folder), "line(s) 1"
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert expected in result.stderr
