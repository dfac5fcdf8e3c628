"""Evaluators that read embeddings: zero-shot, retrieval, linear probe and kNN."""

from mmjax.evaluate.evaluator import Evaluator
from mmjax.evaluate.probe import knn_accuracy, linear_probe_accuracy
from mmjax.evaluate.retrieval import retrieval_recall
from mmjax.evaluate.zeroshot import class_embeddings, zeroshot_accuracy

__all__ = ["Evaluator", "class_embeddings", "knn_accuracy", "linear_probe_accuracy", "retrieval_recall",
           "zeroshot_accuracy"]
