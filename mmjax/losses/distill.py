"""SigLIP 2's late-training losses, as pure functions: local-to-global consistency (SILC's
self-distillation: the student's embeddings of local crops match the EMA teacher's of the full
image) and masked prediction (TIPS / iBOT: the student's features at masked patches match the
teacher's unmasked ones), plus LocCa's boxes as text tokens.

Both distillation losses compare distributions over K prototypes (a projection head's
logits): the teacher's softmax((t - center) / teacher_temp) as the target, the student's
log_softmax(s / student_temp), cross-entropy, no gradient into the teacher (DINO's form, which
SILC and TIPS use). The teacher's center follows its mean logits (`update_center`), which keeps
it from collapsing onto one prototype.

  loss = consistency_loss(student_local, teacher_global, center)
  loss = masked_prediction_loss(student_tokens, teacher_tokens, mask, center)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.numerics import check_array


def _teacher_probs(teacher: jax.Array, center: jax.Array | None, temp: float) -> jax.Array:
  t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  if center is not None:
    t = t - jax.lax.stop_gradient(center.astype(jnp.float32))
  return jax.nn.softmax(t / temp, axis=-1)


def _check_temps(student_temp: float, teacher_temp: float) -> None:
  for name, t in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
    if not t > 0:
      raise ValueError(f"{name}={t} must be positive")


def consistency_loss(student: jax.Array, teacher: jax.Array, center: jax.Array | None = None,
                     *, student_temp: float = 0.1, teacher_temp: float = 0.04) -> jax.Array:
  """Local-to-global self-distillation (SILC): every local view's prototype distribution
  matches the teacher's of the full image.

  Args:
    student: [v, b, K] float, the student's prototype logits of v local views of b images.
    teacher: [b, K] float, the EMA teacher's logits of the full images (no gradient).
    center: [K] float or None, subtracted from the teacher's logits.

  Returns:
    [] float32: mean over views and images of -sum_k p_teacher log p_student.
  """
  check_array("student", student, ("views", "batch", "prototypes"))
  check_array("teacher", teacher, ("batch", "prototypes"))
  if student.shape[1:] != teacher.shape:
    raise ValueError(f"student {student.shape} must be [views, *teacher {teacher.shape}]")
  _check_temps(student_temp, teacher_temp)
  target = _teacher_probs(teacher, center, teacher_temp)
  logp = jax.nn.log_softmax(student.astype(jnp.float32) / student_temp, axis=-1)
  return -jnp.mean(jnp.sum(target[None] * logp, axis=-1))


def masked_prediction_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array,
                           center: jax.Array | None = None, *, student_temp: float = 0.1,
                           teacher_temp: float = 0.04) -> jax.Array:
  """Masked prediction (TIPS / iBOT): at the patches the student saw masked, its prototype
  distribution matches the teacher's, which saw the whole image.

  Args:
    student: [b, n, K] float, the student's per-patch prototype logits (masked input).
    teacher: [b, n, K] float, the teacher's (unmasked input; no gradient).
    mask: [b, n] bool, True where the student's patch was masked; the loss averages over
      those only (0 when none is).
    center: [K] float or None.

  Returns:
    [] float32.
  """
  check_array("student", student, ("batch", "patches", "prototypes"))
  if teacher.shape != student.shape or mask.shape != student.shape[:2]:
    raise ValueError(f"teacher {teacher.shape} must equal student {student.shape} and mask "
                     f"{mask.shape} be [batch, patches] = {student.shape[:2]}")
  _check_temps(student_temp, teacher_temp)
  target = _teacher_probs(teacher, center, teacher_temp)
  logp = jax.nn.log_softmax(student.astype(jnp.float32) / student_temp, axis=-1)
  per_patch = -jnp.sum(target * logp, axis=-1)                      # [b, n]
  m = mask.astype(jnp.float32)
  return jnp.sum(per_patch * m) / jnp.maximum(jnp.sum(m), 1.0)


def update_center(center: jax.Array, teacher: jax.Array, momentum: float = 0.9,
                  where: jax.Array | None = None) -> jax.Array:
  """center * momentum + (1 - momentum) * the teacher logits' mean over every leading axis:
  [K] and [..., K] -> [K] float32; where [...] bool (None: all): the rows averaged (a NaFlex
  tower's valid tokens)."""
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum={momentum} must be in [0, 1]")
  rows = teacher.astype(jnp.float32).reshape(-1, teacher.shape[-1])
  if where is None:
    mean = jnp.mean(rows, axis=0)
  else:
    w = where.reshape(-1, 1).astype(jnp.float32)
    mean = jnp.sum(rows * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)
  return momentum * center.astype(jnp.float32) + (1.0 - momentum) * jax.lax.stop_gradient(mean)


def box_tokens(boxes, bins: int, offset: int):
  """LocCa's boxes as text tokens: each normalised coordinate (x0, y0, x1, y1 in [0, 1]) in one
  of `bins` equal bins, as token id offset + bin. boxes: [..., 4] float -> [..., 4] int32 (a
  NumPy array for NumPy boxes: the host's data workers call it too)."""
  if bins < 2:
    raise ValueError(f"bins={bins} must be at least 2")
  xp = jnp if isinstance(boxes, jax.Array) else np
  b = xp.floor(xp.clip(xp.asarray(boxes, xp.float32), 0.0, 1.0) * bins)
  return (xp.minimum(b, bins - 1) + offset).astype(xp.int32)


def token_boxes(tokens: jax.Array, bins: int, offset: int) -> jax.Array:
  """box_tokens' inverse: each token the centre of its bin; ids outside [offset, offset +
  bins) clip to the nearest bin. [..., 4] int -> [..., 4] float32 in [0, 1]."""
  b = jnp.clip(jnp.asarray(tokens) - offset, 0, bins - 1).astype(jnp.float32)
  return (b + 0.5) / bins


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Intersection over union of boxes (x0, y0, x1, y1): [..., 4] and [..., 4] -> [...]; an
  empty union gives 0."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  w = jnp.maximum(0.0, jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]))
  h = jnp.maximum(0.0, jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]))
  area = lambda x: jnp.maximum(0.0, x[..., 2] - x[..., 0]) * jnp.maximum(0.0, x[..., 3] - x[..., 1])
  inter = w * h
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
