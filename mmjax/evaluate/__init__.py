"""Evaluators that read embeddings: zero-shot classification and retrieval."""

from mmjax.evaluate.retrieval import retrieval_recall
from mmjax.evaluate.zeroshot import class_embeddings, zeroshot_accuracy

__all__ = ["class_embeddings", "retrieval_recall", "zeroshot_accuracy"]
