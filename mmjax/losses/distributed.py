"""Contrastive losses over a batch sharded along a named axis (shard_map or pmap).

Every function here runs per device on its local rows: img_emb, txt_emb are
[n, d] shards of the global [N, d] batch, N = n * axis_size, and returns the
loss of the *global* batch (the dense loss on the gathered embeddings), the
same value on every device.

  gather: all-gather the other tower's embeddings, with gradients through the
    gather (open_clip's local_loss + gather_with_grad): n x N logits per device.
    With bf16 embeddings the gather's transpose (a reduce-scatter) sums the devices'
    gradient parts in bf16, each part already rounded; the rings accumulate in float32
    and round once (tests/test_bf16.py measures both).
  ring: text embeddings travel the ring by ppermute, one n x n block per step.
    A custom VJP recomputes each block in the backward pass, so no step's
    logits are kept; the backward is a second ring pass in which each
    text-gradient accumulator travels with its chunk back to its owner.
    CLIP's softmax keeps a running log-sum-exp per row (and per column, carried
    with the text chunk), as in Inf-CL.
  ring_bidir (SigLIP): the ring with chunks travelling both ways, size//2 steps.

How a ring step computes its n x n block is a `Blocks` value
(mmjax/losses/blocks.py): "dense" (the block's logits in memory, n^2 floats
per step), or "tiled" / "pallas" (tile by tile, mmjax/losses/tiled.py and
mmjax/pallas/contrastive.py), which keep per-device memory at
O(n * d + block^2) whatever n.

Gradient conventions follow JAX's own collectives: under shard_map with
check_vma=True the gradients are those of the global loss; under pmap (or
check_vma=False) each device's gradient of its copy of the loss is axis_size
times that, as for a psum'd loss, so the usual pmean of gradients is right.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mmjax.losses.blocks import DENSE, Blocks, diag_logits
from mmjax.logit_tiles import dot_nt
from mmjax.numerics import vary_over

Axis = str | tuple[str, ...]


def _names(axis: Axis) -> tuple[str, ...]:
  return axis if isinstance(axis, tuple) else (axis,)


def _tracks_vma(x: jax.Array, axis: Axis) -> bool:
  """True under shard_map(check_vma=True), where x varies over the batch axis."""
  return set(_names(axis)) <= set(jax.typeof(x).manual_axis_type.varying)


def _to_varying(x: jax.Array, axis: Axis) -> jax.Array:
  return vary_over(x, _names(axis))


def _shift(x, axis: Axis, size: int, offset: int = 1):
  """Sends each device's x `offset` places along the ring (device i gets i-offset's)."""
  return lax.ppermute(x, axis, [(j, (j + offset) % size) for j in range(size)])


# ---------------------------------------------------------------- gather

def _global_positions(n: int, axis: Axis) -> jax.Array:
  return lax.axis_index(axis) * n + jnp.arange(n)


def clip_gather(img_emb, txt_emb, scale, *, axis_name: Axis):
  n = img_emb.shape[0]
  all_img = lax.all_gather(img_emb, axis_name, tiled=True)   # [N, d], grads flow back
  all_txt = lax.all_gather(txt_emb, axis_name, tiled=True)
  scale = jnp.asarray(scale, jnp.float32)
  pos = _global_positions(n, axis_name)
  i2t = scale * dot_nt(img_emb, all_txt)                       # [n, N]
  t2i = scale * dot_nt(txt_emb, all_img)                       # [n, N]
  ce = lambda z: jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, pos[:, None], 1)[:, 0]
  total = lax.psum(jnp.sum(ce(i2t)) + jnp.sum(ce(t2i)), axis_name)
  return 0.5 * total / (n * lax.axis_size(axis_name))


def siglip_gather(img_emb, txt_emb, scale, bias, *, axis_name: Axis):
  n = img_emb.shape[0]
  all_txt = lax.all_gather(txt_emb, axis_name, tiled=True)
  logits = jnp.asarray(scale, jnp.float32) * dot_nt(img_emb, all_txt) + jnp.asarray(bias, jnp.float32)
  z = jnp.where(_global_positions(n, axis_name)[:, None] == jnp.arange(all_txt.shape[0]), 1.0, -1.0)
  total = lax.psum(-jnp.sum(jax.nn.log_sigmoid(z * logits)), axis_name)
  return total / (n * lax.axis_size(axis_name))


# ---------------------------------------------------------------- siglip ring

def _siglip_accumulate(blocks, x, s, b, g, y_cur, positive, dx, acc, ds, db):
  """Adds one block's gradients: dx and ds, db to this device's sums, dy to the
  accumulator `acc` that travels with the text chunk y_cur."""
  gx, gy, gs, gb = blocks.siglip_grads(x, y_cur, s, b, g, positive)
  return dx + gx, acc + gy, ds + gs, db + gb


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _siglip_ring(x, y, s, b, axis, blocks):
  return _siglip_ring_fwd(x, y, s, b, axis, blocks)[0]


def _siglip_ring_fwd(x, y, s, b, axis, blocks):
  size = lax.axis_size(axis)
  total = blocks.siglip_sum(x, y, s, b, True)

  def step(_, carry):
    y_cur, total = carry
    y_cur = _shift(y_cur, axis, size)
    return y_cur, total + blocks.siglip_sum(x, y_cur, s, b, False)

  _, total = lax.fori_loop(1, size, step, (y, total))
  loss = lax.psum(total, axis) / (x.shape[0] * size)
  return loss, (x, y, s, b)


def _siglip_ring_bwd(axis, blocks, res, g):
  x, y, s, b = res
  size, n = lax.axis_size(axis), x.shape[0]
  if not _tracks_vma(x, axis):
    g = lax.psum(g, axis)      # pmap semantics: every device's loss copy seeds 1
  g = g / (n * size)

  accumulate = functools.partial(_siglip_accumulate, blocks, x, s, b, g)

  zeros = lambda a: jnp.zeros(a.shape, jnp.float32)
  dx, acc, ds, db = accumulate(y, True, zeros(x), zeros(y), zeros(s), zeros(b))

  def step(_, carry):
    y_cur, acc, dx, ds, db = carry
    y_cur, acc = _shift(y_cur, axis, size), _shift(acc, axis, size)
    dx, acc, ds, db = accumulate(y_cur, False, dx, acc, ds, db)
    return y_cur, acc, dx, ds, db

  _, acc, dx, ds, db = lax.fori_loop(1, size, step, (y, acc, dx, ds, db))
  dy = _shift(acc, axis, size)   # the accumulator's last hop: home to its chunk's owner
  return dx.astype(x.dtype), dy.astype(y.dtype), ds.astype(s.dtype), db.astype(b.dtype)


_siglip_ring.defvjp(_siglip_ring_fwd, _siglip_ring_bwd)


def _siglip_entry(kernel):
  """The public (img_emb, txt_emb, scale, bias, *, axis_name, blocks) form of a custom-VJP ring.

  scale and bias enter the kernel as varying values: their per-device gradients
  are then summed over devices by JAX's transpose of that cast.
  """
  def loss(img_emb, txt_emb, scale, bias, *, axis_name: Axis, blocks: Blocks = DENSE):
    s = _to_varying(jnp.asarray(scale, jnp.float32), axis_name)
    b = _to_varying(jnp.asarray(bias, jnp.float32), axis_name)
    return kernel(img_emb, txt_emb, s, b, axis_name, blocks)
  return loss


siglip_ring = _siglip_entry(_siglip_ring)


# ---------------------------------------------------------------- siglip bidirectional ring
# Text chunks travel both ways at once: after k steps a device holds the chunks
# of i-k and i+k, so size-1 blocks take size//2 steps, each link busy both ways.
# The backward runs the same two streams; each gradient accumulator then goes
# home in one ppermute of the distance it travelled.

def _bidir_steps(size: int) -> tuple[int, int]:
  """Steps of the forward (+1) and backward (-1) streams; with an even size the
  chunk opposite on the ring is taken once, by the forward stream."""
  return size // 2, (size - 1) // 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _siglip_bidir(x, y, s, b, axis, blocks):
  return _siglip_bidir_fwd(x, y, s, b, axis, blocks)[0]


def _siglip_bidir_fwd(x, y, s, b, axis, blocks):
  size = lax.axis_size(axis)
  n_fwd, n_bwd = _bidir_steps(size)
  total = blocks.siglip_sum(x, y, s, b, True)

  def step(_, carry):
    y_f, y_b, total = carry
    y_f, y_b = _shift(y_f, axis, size, 1), _shift(y_b, axis, size, -1)
    total = total + blocks.siglip_sum(x, y_f, s, b, False) + blocks.siglip_sum(x, y_b, s, b, False)
    return y_f, y_b, total

  y_f, _, total = lax.fori_loop(0, n_bwd, step, (y, y, total))
  if n_fwd > n_bwd:
    total = total + blocks.siglip_sum(x, _shift(y_f, axis, size, 1), s, b, False)
  loss = lax.psum(total, axis) / (x.shape[0] * size)
  return loss, (x, y, s, b)


def _siglip_bidir_bwd(axis, blocks, res, g):
  x, y, s, b = res
  size, n = lax.axis_size(axis), x.shape[0]
  n_fwd, n_bwd = _bidir_steps(size)
  if not _tracks_vma(x, axis):
    g = lax.psum(g, axis)
  g = g / (n * size)

  accumulate = functools.partial(_siglip_accumulate, blocks, x, s, b, g)

  zeros = lambda a: jnp.zeros(a.shape, jnp.float32)
  dx, acc_f, ds, db = accumulate(y, True, zeros(x), zeros(y), zeros(s), zeros(b))

  def step(_, carry):
    y_f, y_b, acc_f, acc_b, dx, ds, db = carry
    y_f, acc_f = _shift(y_f, axis, size, 1), _shift(acc_f, axis, size, 1)
    y_b, acc_b = _shift(y_b, axis, size, -1), _shift(acc_b, axis, size, -1)
    dx, acc_f, ds, db = accumulate(y_f, False, dx, acc_f, ds, db)
    dx, acc_b, ds, db = accumulate(y_b, False, dx, acc_b, ds, db)
    return y_f, y_b, acc_f, acc_b, dx, ds, db

  carry = (y, y, acc_f, _to_varying(zeros(y), axis), dx, ds, db)
  y_f, _, acc_f, acc_b, dx, ds, db = lax.fori_loop(0, n_bwd, step, carry)
  if n_fwd > n_bwd:
    y_f, acc_f = _shift(y_f, axis, size, 1), _shift(acc_f, axis, size, 1)
    dx, acc_f, ds, db = accumulate(y_f, False, dx, acc_f, ds, db)
  # Home: the forward stream's accumulator is n_fwd places ahead of its owner, the other n_bwd behind.
  dy = _shift(acc_f, axis, size, -n_fwd) + _shift(acc_b, axis, size, n_bwd)
  return dx.astype(x.dtype), dy.astype(y.dtype), ds.astype(s.dtype), db.astype(b.dtype)


_siglip_bidir.defvjp(_siglip_bidir_fwd, _siglip_bidir_bwd)


siglip_ring_bidir = _siglip_entry(_siglip_bidir)


# ---------------------------------------------------------------- clip ring

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _clip_ring(x, y, s, axis, blocks):
  return _clip_ring_fwd(x, y, s, axis, blocks)[0]


def _clip_ring_fwd(x, y, s, axis, blocks):
  size, n = lax.axis_size(axis), x.shape[0]
  # Over texts for my image rows; over images for the chunk I hold (travels with it).
  row_lse, col_lse = blocks.clip_lse(x, y, s)
  diag = diag_logits(x, y, s)

  def step(_, carry):
    y_cur, col_cur, row_lse = carry
    y_cur, col_cur = _shift(y_cur, axis, size), _shift(col_cur, axis, size)
    block_row, block_col = blocks.clip_lse(x, y_cur, s)
    return y_cur, jnp.logaddexp(col_cur, block_col), jnp.logaddexp(row_lse, block_row)

  _, col_cur, row_lse = lax.fori_loop(1, size, step, (y, col_lse, row_lse))
  col_lse = _shift(col_cur, axis, size)           # home: column LSE of my own texts
  local = jnp.sum(row_lse - diag) + jnp.sum(col_lse - diag)
  loss = 0.5 * lax.psum(local, axis) / (n * size)
  return loss, (x, y, s, row_lse, col_lse)


def _clip_ring_bwd(axis, blocks, res, g):
  x, y, s, row_lse, col_lse = res
  size, n = lax.axis_size(axis), x.shape[0]
  if not _tracks_vma(x, axis):
    g = lax.psum(g, axis)
  g = 0.5 * g / (n * size)

  def accumulate(y_cur, col_cur, positive, dx, acc, ds):
    gx, gy, gs = blocks.clip_grads(x, y_cur, s, row_lse, col_cur, g, positive)
    return dx + gx, acc + gy, ds + gs

  zeros = lambda a: jnp.zeros(a.shape, jnp.float32)
  dx, acc, ds = accumulate(y, col_lse, True, zeros(x), zeros(y), zeros(s))

  def step(_, carry):
    y_cur, col_cur, acc, dx, ds = carry
    y_cur, col_cur, acc = (_shift(a, axis, size) for a in (y_cur, col_cur, acc))
    dx, acc, ds = accumulate(y_cur, col_cur, False, dx, acc, ds)
    return y_cur, col_cur, acc, dx, ds

  _, _, acc, dx, ds = lax.fori_loop(1, size, step, (y, col_lse, acc, dx, ds))
  dy = _shift(acc, axis, size)
  return dx.astype(x.dtype), dy.astype(y.dtype), ds.astype(s.dtype)


_clip_ring.defvjp(_clip_ring_fwd, _clip_ring_bwd)


def clip_ring(img_emb, txt_emb, scale, *, axis_name: Axis, blocks: Blocks = DENSE):
  s = _to_varying(jnp.asarray(scale, jnp.float32), axis_name)
  return _clip_ring(img_emb, txt_emb, s, axis_name, blocks)
