"""Evaluation: one streaming library for the trainer and the command line alike.

evaluators: the evaluator types registered by name (zeroshot, retrieval, probe, captioning,
rerank); evaluator.Evaluator: a run's evaluators, each on its own schedule (config.evals);
streaming: splits read in fixed-size batches through jitted encoders; the metric functions.
"""

from mmjax.evaluate.evaluator import Evaluator, check_evals
from mmjax.evaluate.evaluators import Inputs, NotApplicable, names, register
from mmjax.evaluate.probe import knn_accuracy, linear_probe_accuracy
from mmjax.evaluate.retrieval import retrieval_recall
from mmjax.evaluate.streaming import Embedded, Memo, Split, Texts
from mmjax.evaluate.zeroshot import class_embeddings, zeroshot_accuracy

__all__ = ["Embedded", "Evaluator", "Inputs", "Memo", "NotApplicable", "Split", "Texts",
           "check_evals", "class_embeddings", "knn_accuracy", "linear_probe_accuracy", "names",
           "register", "retrieval_recall", "zeroshot_accuracy"]
