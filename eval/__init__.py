"""Evaluation stages: language-model scoring and samples (`eval.lm`), the run report (`eval.report`)."""
