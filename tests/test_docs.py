"""The docs name only code that exists: every Python name that README.md and docs/*.md put in backticks
(`gdro_loss`, `gdro.sample_t`, `build_text_model`, `velocity_errors(...)`, `OcrReward()(images, prompts)`) is an
attribute of one of the project's modules, and every test named there is a test function. A function renamed in
the code but not in the docs fails here. Seconds: it imports the modules and reads text, nothing runs."""
import builtins
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODULES = ("gdro", "families", "eval", "reward_ocr", "reward_geneval", "experiments.run", "experiments.text_model",
           "experiments.toy_reward", "experiments.bench", "experiments.flow_grpo", "experiments.compare",
           "experiments.geneval_prompts", "experiments.scene_model", "experiments.scene_detector",
           "experiments.scene_gdro")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A backticked span that is a name, a dotted name, or either called: `name`, `mod.name`, `name(...)`,
# `OcrReward()(images, prompts)`. The argument lists hold no parentheses, so a formula such as
# `q(j) = softmax_j(r_j / tau)` is not a call.
NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)((?:\([^()]*\))*)$")
# `gdro.py`, `metrics.jsonl`, `state.pt`: file names, not attributes.
FILE_EXTENSIONS = {"py", "txt", "json", "jsonl", "md", "png", "pt", "safetensors", "toml", "cfg", "sh"}

# Names the docs may put in backticks that are not the project's own, with why.
NOT_PROJECT_NAMES = {
    # metrics.jsonl keys (gdro.train writes them)
    "rank_acc", "tied_groups", "grad_norm", "err_policy", "err_ref", "time_s",
    # eval.py's report.json and scores.jsonl keys
    "ocr_reward", "ocr_exact", "n_images", "prompt_index", "judge_answer", "tag_accuracy", "geneval_score",
    "nan_images",
    # experiments/run.py --ocr's results.json keys
    "base_ocr", "gdro_ocr", "base_exact", "gdro_exact", "gain_se", "model_dir", "train_prompts", "heldout_prompts",
    # experiments/bench.py's JSON keys (figures, not functions)
    "step_overhead", "rollout_overhead", "ckpt_memory_ratio",
    # --dry-run's plan keys (gdro.training_plan's dict)
    "prompt_coverage", "image_coverage", "est_rollout_gpu_hours_h200", "est_train_gpu_hours_h200",
    # --from-images' metadata.jsonl keys (Hugging Face imagefolder)
    "file_name",
    # the paper's notation in the docs
    "x_t", "q_i", "v_model", "err_theta", "r_corr",
    # torchrun's environment variables
    "WORLD_SIZE", "LOCAL_RANK",
    # W&B's environment variable (families.check_report_to reads it)
    "WANDB_API_KEY",
    # errno names (simulated full disk and permission errors)
    "ENOSPC", "EACCES",
    # diffusers, transformers, peft and torch APIs
    "load_lora_weights", "save_pretrained", "from_pretrained", "compile_repeated_blocks",
    "create_selective_checkpoint_contexts", "disable_input_dtype_casting", "sdpa_kernel",
    "DiffusionPipeline", "StableDiffusion3Pipeline", "FluxPipeline", "AutoProcessor", "QwenImagePipeline",
    "Flux2Pipeline", "Flux2KleinPipeline", "ZImagePipeline", "compute_empirical_mu",
    "Qwen2_5_VLForConditionalGeneration",
}
# Dotted names whose first part is not a project module: a diffusers pipeline object, torch, diffusers' classes.
NOT_PROJECT_PREFIXES = {"pipe", "torch", "diffusers", "transformers", "peft", "DiffusionPipeline", "PIL"}


def inline_code(text):
    """Backticked spans outside fenced code blocks (those hold shell commands and user scripts, not names)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", text)


def looks_like_code(name, called):
    """A name used as code, not a word or a value: called, dotted, snake_case, CamelCase or CONSTANT_CASE.
    Plain lower-case words (`none`, `euler`, `x0`) and short capitals (`DIR`, `OUT`) are values or placeholders."""
    if called or "." in name or "_" in name.strip("_"):
        return True
    return bool(re.fullmatch(r"[A-Z][a-z0-9]+[A-Z][A-Za-z0-9]*", name))  # CamelCase: OcrReward, BadInput


def python_names_in_docs():
    found = {}
    for doc in DOCS:
        for span in inline_code(doc.read_text(encoding="utf-8")):
            m = NAME.match(span.strip())
            if not m:
                continue
            name, called = m.group(1), m.group(2)
            if "." in name and name.rsplit(".", 1)[1] in FILE_EXTENSIONS:
                continue
            if looks_like_code(name, called):
                found.setdefault(name, set()).add(doc.relative_to(ROOT).as_posix())
    return found


def defined_test_functions():
    """def test_... in the test files, by text (running them is the suite's job, not this one's)."""
    files = [*ROOT.glob("test_*.py"), *(ROOT / "tests").glob("test_*.py")]
    return {m for f in files for m in re.findall(r"^def (test_\w+)\(", f.read_text(encoding="utf-8"), flags=re.M)}


def exists(name, modules, tests):
    if name.startswith("test_"):
        return name in tests
    if name in NOT_PROJECT_NAMES or hasattr(builtins, name):
        return True
    head, _, rest = name.partition(".")
    if rest:
        if head in modules:
            return hasattr(modules[head], rest)
        if head in NOT_PROJECT_PREFIXES:
            return True
        return any(hasattr(getattr(m, head, None), rest) for m in modules.values() if hasattr(m, head))
    return any(hasattr(m, name) for m in modules.values())


def test_every_python_name_the_docs_mention_exists_in_the_code():
    modules = {name.rsplit(".", 1)[-1]: importlib.import_module(name) for name in MODULES}
    names = python_names_in_docs()
    assert len(names) > 20, f"the docs' names were not found (only {sorted(names)}): is the collector broken?"
    last_parts = {n.rsplit(".", 1)[-1] for n in names}
    for must in ("gdro_loss", "velocity_errors", "build_text_model", "training_context", "settle_model"):
        assert must in last_parts, f"`{must}` is no longer named in the docs; the collector may have missed it"
    tests = defined_test_functions()
    missing = {n: sorted(docs) for n, docs in names.items() if not exists(n, modules, tests)}
    assert not missing, f"named in the docs but not in the code: {missing}"
