"""Evaluation: per-client metrics of the personalised model (global shared + local parameters)."""

from fednl.eval.metrics import HIGHER_IS_BETTER, PRIMARY_METRIC, evaluate_examples

__all__ = ["HIGHER_IS_BETTER", "PRIMARY_METRIC", "evaluate_examples"]
