"""Scripts that use gdro.py: the CPU experiments, the text model they train on, the benchmark. Run from the
repository root as modules: python -m experiments.run, python -m experiments.text_model, python -m experiments.bench.

What they share is how they refuse input, gdro.py's way: every flag checked before a model loads or long work
starts, a refusal is gdro.BadInput (one line naming the flag and what it accepts, exit 2; gdro.cli prints it)."""
import math
from pathlib import Path

import gdro


from gdro import Parser  # argparse whose refusals are one line, exit 2: every script's


# What a value may be: (test, what it accepts), for check and key_values
AT_LEAST_0 = (lambda x: x >= 0, ">= 0")
AT_LEAST_1 = (lambda x: x >= 1, "at least 1")
AT_LEAST_2 = (lambda x: x >= 2, "at least 2")
POSITIVE = (lambda x: math.isfinite(x) and x > 0, "finite and > 0")
FINITE_AT_LEAST_0 = (lambda x: math.isfinite(x) and x >= 0, "finite and >= 0")
SHARE = (lambda x: 0 <= x <= 1, "between 0 and 1")


def at_most(n, what):
    return lambda x: x <= n, f"at most {n}, {what}"


def check(*rules):
    """Each (flag, value, (test, accepted)) in turn: the first value its test refuses is a BadInput naming it. A flag
    ending in "=" names a KEY= of --set or --scale."""
    for flag, value, (test, accepted) in rules:
        if not test(value):
            raise gdro.BadInput(f"{flag}{'' if flag.endswith('=') else ' '}{value}: must be {accepted}")


def parse_value(kind, text):
    """text as a value of kind (bool, int, float or str); ValueError if it is not one."""
    if kind is bool:
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.lower() not in words:
            raise ValueError(text)
        return words[text.lower()]
    return kind(text)


def key_values(flag, items, defaults, rules):
    """The KEY=VALUE words given to `flag` as {key: value}: each key one of defaults', its value of the default's type
    and accepted by rules[key] (a (test, accepted) pair; a key without one takes any value of its type)."""
    found = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise gdro.BadInput(f"{flag} {item}: expected KEY=VALUE, KEY one of {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            value = parse_value(kind, text)
        except ValueError:
            raise gdro.BadInput(f"{flag} {item}: {key} takes {'true or false' if kind is bool else kind.__name__}"
                                f" values like {defaults[key]}")
        check((f"{flag} {key}=", value, rules.get(key, (lambda x: True, ""))))
        found[key] = value
    return found


def check_out(out, flag="--out"):
    """An output folder: none yet, or a folder (never a file, nor under one)."""
    out = Path(out)
    above = next(p for p in [out, *out.parents] if p.exists())
    if not above.is_dir():
        raise gdro.BadInput(f"{flag} {out} is a file, not a folder" if above == out else
                            f"{flag} {out}: {above} is a file, not a folder")


def check_model_dir(model_dir, default, build):
    """A text model's folder (text_model.json, written last by its build) or the default folder, which the script
    builds when it holds none; another folder that holds none is refused with `build`, the command that builds it."""
    if not (Path(model_dir) / "text_model.json").is_file() and Path(model_dir) != Path(default):
        raise gdro.BadInput(f"--model-dir {model_dir} holds no text model (no text_model.json); build it first with "
                            f"{build} --out {model_dir}, or leave --model-dir out to build {default} here")
