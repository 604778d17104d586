"""Evaluation: pycocoevalcap scores, the constant-caption baseline, the shuffled-image
control, per-image scores, the HTML report and the metrics chart.

Submodules are imported where used, so a stage pulls in only what it runs.
"""
