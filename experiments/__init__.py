"""Scripts that use gdro.py: the CPU experiments, the text model they train on, the benchmark. Run from the
repository root as modules: python -m experiments.run, python -m experiments.text_model, python -m experiments.bench."""
