"""Evaluation: pycocoevalcap scores, the constant-caption baseline, the shuffled-image
control, per-image scores, the HTML report and the metrics chart."""
from pipeline.evaluate.baseline import Baseline, constant_caption_baseline, frequent_captions
from pipeline.evaluate.cocofiles import EvaluationInputError, load_references, load_results
from pipeline.evaluate.java import JavaMissingError, require_java
from pipeline.evaluate.scores import METRICS, Scores, score_captions, score_tokenized
from pipeline.evaluate.stage import run_evaluate

__all__ = [
    "Baseline", "EvaluationInputError", "JavaMissingError", "METRICS", "Scores",
    "constant_caption_baseline", "frequent_captions", "load_references", "load_results",
    "require_java", "run_evaluate", "score_captions", "score_tokenized",
]
