"""Input checks shared by the evaluators."""

from __future__ import annotations

import numpy as np


def require_finite(evaluator: str, **arrays: np.ndarray) -> None:
  """Raises ValueError naming the evaluator, the array and how many of its rows
  hold a NaN or Inf: a diverged model's embeddings must not get a score (all-NaN
  scores tie, and ties could read as perfect recall).

  arrays: name -> [n, ...] array.
  """
  for name, x in arrays.items():
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
      continue
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(1) if x.ndim else ~np.isfinite(x[None])
    if bad.any():
      raise ValueError(f"{evaluator}: {int(bad.sum())} of {len(bad)} rows of {name} are not "
                       "finite (NaN or Inf); the model's outputs diverged")
