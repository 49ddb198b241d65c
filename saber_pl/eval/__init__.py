"""Evaluation: the OpenS2V-Eval harness (`opens2v`) and built-in metrics that need no external weights (`metrics`).

See docs/eval.md for what each number measures, how, and its range.
"""
