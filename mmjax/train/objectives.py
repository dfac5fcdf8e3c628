"""What a run optimises (config.loss): CLIP / SigLIP two towers, MAE, MoCo v3, CatLIP, CoCa.

One train step and one loop serve them all; an `Objective` supplies what
differs, and owns its loss. LiT is a contrastive run with config.frozen and
config.init_from; FLIP one with config.model.image.patch_dropout.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmjax.data import catlip_vocab
from mmjax.losses import clip_loss, infonce_loss, multilabel_bce_loss, siglip_loss
from mmjax.losses.captioning import caption_loss, hard_negatives, itm_loss
from mmjax.models import catlip, coca, image as image_model, mae, moco, resnet
from mmjax.models import text as text_model, two_tower, vit
from mmjax.numerics import dtype, l2_normalize
from mmjax.train.config import CONTRASTIVE, LOSSES
from mmjax.train.optimizer import stop_frozen

Params = Any


class Objective(Protocol):
  """What an objective supplies to the train step, the loop and the evaluator.

  model: the Flax module; batch_keys: the batch fields grad_fn reads (the
  loop shards exactly these). `frozen`: None or a pytree of 'frozen' / 'train'
  labels over the params (config.frozen, worked out once by the loop): no
  gradient flows through the frozen ones. The momentum-encoder hooks default
  to "no momentum encoder" and the two-tower hook to "not a two-tower model".
  """
  model: nn.Module
  batch_keys: tuple[str, ...]
  frozen: Any = None

  def init(self, rng: jax.Array, batch: dict) -> Params:
    """params from a dummy batch (shapes only matter)."""
    ...

  def grad_fn(self, params: Params, ema: Any, batch: dict, rng: jax.Array
              ) -> tuple[tuple[jax.Array, dict], Params]:
    """((loss, metrics), grads) of the global batch."""
    ...

  def features(self, params: Params, image: jax.Array) -> jax.Array:
    """[b, H, W, 3] -> [b, d] image features for the linear probe and kNN."""
    ...

  def ema_init(self, params: Params) -> Any:
    """The momentum encoder's initial params, or None when there is none."""
    return None

  def ema_update(self, ema: Any, params: Params, step: jax.Array) -> Any:
    return ema

  def towers(self) -> tuple[Callable, Callable] | None:
    """(embed_image(params, image), embed_text(params, tokens)) -> unit-norm
    [b, e] for zero-shot and retrieval; None for an image-only objective."""
    return None

  def transfer_head(self, params: Params, class_names: list[str]
                    ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(w [d, c], b [c], classes found): a classifier of features() for the named
    classes taken from what was learnt (CatLIP: the head's rows of the class names); None
    when the objective has no such head."""
    return None

  def save_or_check(self, workdir: str) -> None:
    """Writes what a run keeps beside its checkpoints (CatLIP: its label vocabulary) on a
    fresh run, or checks a resumed run's equals it; nothing for most objectives."""

  def with_frozen(self, frozen: Any) -> "Objective":
    """A copy whose grad_fn stops gradients at the leaves labelled 'frozen'."""
    new = copy.copy(self)
    new.frozen = frozen
    return new

  def _freeze(self, params: Params) -> Params:
    return params if self.frozen is None else stop_frozen(params, self.frozen)


def train_apply(model, params: Params, *args, **kwargs):
  """model.apply({'params': params}, *args, train=True, **kwargs) -> (outputs, the
  'batch_stats' the pass sowed: {} unless a tower has BatchNorm on batch statistics)."""
  out, state = model.apply({"params": params}, *args, train=True, mutable=["batch_stats"],
                           **kwargs)
  return out, dict(state).get("batch_stats", {})


def _with_stats(aux: dict, stats: dict) -> dict:
  """aux with stats under 'batch_stats' (the train step pops them: resnet.update_batch_stats)."""
  return {**aux, "batch_stats": stats} if stats else aux


def tower_config(config: ml_collections.ConfigDict, tower: str, **extra) -> dict:
  """The complete fields of config.model.<tower> (vit.ViT or resnet.ResNet, by variant:
  mmjax.models.image; text.TextTransformer),
  decoded and checked once; a bad field raises one ValueError naming
  config.model.<tower>.<field>. extra: fields the config does not hold."""
  m = config.model
  fields = {k: v for k, v in m[tower].items() if v is not None}
  if tower == "text":
    fields.pop("patch_dropout", None)
  fields.update(dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype), remat=m.remat,
                remat_policy=m.remat_policy, scan=m.scan, attention_impl=m.attention_impl,
                **extra)
  resolve = image_model.config if tower == "image" else text_model.config
  try:
    return resolve(**fields)
  except ValueError as e:
    raise ValueError(f"config.model.{tower}.{e}") from None


def build_two_tower(config: ml_collections.ConfigDict, vocab_size: int,
                    converted: dict | None = None) -> two_tower.TwoTower:
  """The two-tower model of config.model; its towers are checked here, so a bad one fails early.

  converted: the `two_tower.Model` kwargs of a converted checkpoint (Converted.config), whose
  architecture replaces config.model's towers; config.model's dtype, param_dtype, remat,
  remat_policy, scan, attention_impl and image.patch_dropout still apply (the loop stacks the
  checkpoint's per-layer params for scan=True: mmjax.models.scan.match_blocks).
  """
  m = config.model
  if converted is not None:
    runtime = dict(dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype), remat=m.remat,
                   remat_policy=m.remat_policy, scan=m.scan, attention_impl=m.attention_impl)
    image = dict(converted["image"], patch_dropout=m.image.patch_dropout, **runtime)
    if m.image.norm is not None:   # e.g. 'batch': fine-tune an open_clip RN's BatchNorm
      if not image_model.is_resnet(image):
        raise ValueError(f"config.model.image.norm={m.image.norm!r}: the checkpoint's image "
                         "tower is a ViT, which has no such field")
      image["norm"] = m.image.norm
    return two_tower.Model(
        image=image,
        text=dict(converted["text"], **runtime),
        **{k: v for k, v in converted.items() if k not in ("image", "text")},
        dtype=runtime["dtype"], param_dtype=runtime["param_dtype"])
  image = tower_config(config, "image")
  image_proj = "dense"
  if image_model.is_resnet(image) and resnet.pool_type(image) == "attn":
    # CLIP's ResNet: the attention pool's output projection is the one to embed_dim.
    image, image_proj = dict(image, output_dim=m.embed_dim), "none"
  return two_tower.TwoTower(
      image=image, image_proj=image_proj,
      text=tower_config(config, "text", vocab_size=vocab_size, max_len=config.data.text_len),
      embed_dim=m.embed_dim, loss=config.loss,
      temperature_init=m.temperature_init, bias_init=m.bias_init,
      dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype))


# ---------------------------------------------------------------- contrastive

def contrastive_loss(loss: str, impl: str = "global", blocks: str = "dense", *,
                     mesh: Mesh | None = None, axes: tuple[str, ...] = ()) -> Callable:
  """(zimg [B, e], ztxt [B, e], out) -> scalar loss of the global batch.

  impl 'global' leaves the partitioning to XLA; 'gather' / 'ring' /
  'ring_bidir' run the sharded loss inside shard_map over the mesh's batch
  `axes`. blocks: 'dense' | 'tiled' | 'pallas' (mmjax.losses).
  """
  if loss not in CONTRASTIVE:
    raise ValueError(f"loss must be one of {CONTRASTIVE}; got {loss!r}")

  def local(zimg, ztxt, scale, bias, axis_name=None):
    kw = dict(impl=impl, blocks=blocks, axis_name=axis_name)
    if loss == "siglip":
      return siglip_loss(zimg, ztxt, scale, bias, **kw)
    return clip_loss(zimg, ztxt, scale, **kw)

  if impl == "global":
    fn = local
  else:
    if mesh is None or not axes:
      raise ValueError(f"loss_impl={impl!r} needs a mesh with batch axes")
    # The Pallas interpreter (CPU) fails under check_vma=True; the kernels lower with either.
    fn = jax.shard_map(lambda *a: local(*a, axis_name=axes), mesh=mesh,
                       in_specs=(P(axes), P(axes), P(), P()), out_specs=P(),
                       check_vma=blocks != "pallas")
  return lambda zimg, ztxt, out: fn(zimg, ztxt, out["scale"], out.get("bias", jnp.zeros(())))


def make_grad_fn(model, loss_of: Callable, *, accum_steps: int = 1,
                 freeze: Callable[[Params], Params] | None = None) -> Callable:
  """grad_fn(params, batch, rng) -> ((loss, out), grads) of the global-batch loss.

  accum_steps = k > 1 is contrastive gradient accumulation (GradCache): the
  batch is split into k micro-batches; all are embedded without keeping
  activations, the loss and its gradient wrt the embeddings are computed on
  the full batch, then each micro-batch's towers are re-run and the cached
  embedding gradients backpropagated. The gradients equal the full-batch ones;
  peak activation memory is that of one micro-batch. Micro-batch j takes rows
  j, j+k, j+2k, ..., so each stays split over all devices of the batch axes.
  """
  if accum_steps < 1:
    raise ValueError(f"config.accum_steps must be >= 1; got {accum_steps}")
  freeze = freeze or (lambda p: p)

  def embed(params, image, text, rng, with_stats=False):
    (zimg, ztxt, _), stats = train_apply(model, freeze(params), image, text,
                                         rngs={"dropout": rng})
    return ((zimg, ztxt), stats) if with_stats else (zimg, ztxt)

  def head_loss(zimg, ztxt, params):
    _, _, out = model.apply({"params": params}, None, None)   # scale, bias from t, b
    return loss_of(zimg, ztxt, out), out

  if accum_steps == 1:
    def full(params, batch, rng):
      def loss_fn(p):
        z, stats = embed(p, batch["image"], batch["text"], rng, with_stats=True)
        value, out = head_loss(*z, p)
        return value, _with_stats(out, stats)
      return jax.value_and_grad(loss_fn, has_aux=True)(params)
    return full

  k = accum_steps

  def accumulated(params, batch, rng):
    b = batch["image"].shape[0]
    if b % k:
      raise ValueError(f"batch {b} is not divisible by config.accum_steps={k}")
    split = lambda x: x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)    # [k, b/k, ...]
    merge = lambda x: x.swapaxes(0, 1).reshape(b, *x.shape[2:])
    micro = {key: split(batch[key]) for key in ("image", "text")}
    rngs = jax.random.split(rng, k)
    zimg, ztxt = jax.lax.map(
        lambda a: embed(jax.lax.stop_gradient(params), a[0]["image"], a[0]["text"], a[1]),
        (micro, rngs))
    (value, out), (dzimg, dztxt, grads) = jax.value_and_grad(
        lambda zi, zt, p: head_loss(merge(zi), merge(zt), p), argnums=(0, 1, 2),
        has_aux=True)(zimg, ztxt, params)

    def backprop(grads, xs):
      mb, r, dzi, dzt = xs
      _, vjp = jax.vjp(lambda p: embed(p, mb["image"], mb["text"], r), params)
      return jax.tree.map(jnp.add, grads, vjp((dzi, dzt))[0]), None

    grads, _ = jax.lax.scan(backprop, grads, (micro, rngs, dzimg, dztxt))
    return (value, out), grads

  return accumulated


class Contrastive(Objective):
  """CLIP / SigLIP on image-text pairs (also LiT and FLIP); the loss is
  config.loss_impl x config.loss_blocks, with GradCache for config.accum_steps > 1."""
  batch_keys = ("image", "text")

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, *,
               mesh: Mesh | None = None, batch_axes: tuple[str, ...] = (),
               converted: dict | None = None):
    self.model = build_two_tower(config, vocab_size, converted)
    self.accum_steps = config.accum_steps
    if self.accum_steps > 1 and image_model.uses_batch_stats(self.model.image):
      raise ValueError(f"config.accum_steps={self.accum_steps}: GradCache's micro-batches "
                       "would each normalise by their own BatchNorm statistics "
                       "(config.model.image.norm='batch'); use norm='group' or accum_steps=1")
    self.loss_of = contrastive_loss(config.loss, config.loss_impl, config.loss_blocks,
                                    mesh=mesh, axes=batch_axes)

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def grad_fn(self, params, ema, batch, rng):
    del ema
    grad = make_grad_fn(self.model, self.loss_of, accum_steps=self.accum_steps,
                        freeze=self._freeze)
    (value, out), grads = grad(params, batch, rng)
    return (value, dict(out)), grads

  def features(self, params, image):
    return self.towers()[0](params, image)

  def towers(self):
    return _encoders(self.model)


def _encoders(model):
  """(image(params, images) -> [b, e], text(params, texts) -> [b, e]) of a two-tower-like model."""
  return (lambda p, x: model.apply({"params": p}, x, method="encode_image"),
          lambda p, t: model.apply({"params": p}, t, method="encode_text"))


class MAE(Objective):
  """Masked autoencoder on images (the text field is not read)."""
  batch_keys = ("image",)

  def __init__(self, config: ml_collections.ConfigDict):
    m = config.model
    image = tower_config(config, "image")
    if image_model.is_resnet(image):
      raise ValueError(f"config.model.image.variant={m.image.variant!r}: MAE masks and "
                       "reconstructs a ViT's patches; use a ViT variant ('Ti/4', 'B/16')")
    self.model = mae.MAE(image=image, **m.mae,
                           dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype))

  def init(self, rng, batch):
    r1, r2 = jax.random.split(rng)
    return self.model.init({"params": r1, "mask": r2}, batch["image"])["params"]

  def grad_fn(self, params, ema, batch, rng):
    del ema
    r1, r2 = jax.random.split(rng)

    def loss(p):
      value, _ = self.model.apply({"params": self._freeze(p)}, batch["image"], train=True,
                                  rngs={"mask": r1, "dropout": r2})
      return value, {}   # a ViT: no batch statistics
    return jax.value_and_grad(loss, has_aux=True)(params)

  def features(self, params, image):
    return self.model.apply({"params": params}, image, method="image_features")


class MoCo(Objective):
  """MoCo v3: two views, a momentum encoder, symmetric InfoNCE."""
  batch_keys = ("image", "image2")

  def __init__(self, config: ml_collections.ConfigDict):
    m = config.model
    c = dict(m.moco)
    self.temperature, self.base_momentum = c.pop("temperature"), c.pop("momentum")
    self.total_steps = config.total_steps
    self.model = moco.MoCo(image=tower_config(config, "image"), **c,
                            dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype))

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"])["params"]

  def ema_init(self, params):
    return {k: params[k] for k in moco.EMA_KEYS}

  def ema_update(self, ema, params, step):
    m = moco.momentum(step, self.total_steps, self.base_momentum)
    return jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema,
                        {k: params[k] for k in moco.EMA_KEYS})

  def grad_fn(self, params, ema, batch, rng):
    r1, r2 = jax.random.split(rng)
    views = (batch["image"], batch["image2"])
    # The momentum encoder: the EMA params in place of the online ones (its
    # predictor is never used); no gradient flows into it.
    target = jax.lax.stop_gradient({**params, **ema})
    # (Its BatchNorm statistics, if any, are not kept: the EMA moves its running ones.)
    keys = [l2_normalize(train_apply(self.model, target, v, rngs={"dropout": r})[0][1])
            for v, r in zip(views, (r1, r2))]
    scale = 1.0 / self.temperature

    def loss(p):
      p = self._freeze(p)
      outs = [train_apply(self.model, p, v, rngs={"dropout": r})
              for v, r in zip(views, (r1, r2))]
      q = [l2_normalize(out[0]) for out, _ in outs]
      # MoCo v3 scales each InfoNCE by 2 * temperature.
      value = 2 * self.temperature * (infonce_loss(q[0], keys[1], scale)
                                      + infonce_loss(q[1], keys[0], scale))
      stats = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][1], outs[1][1])   # the two views
      return value, _with_stats({}, stats)
    return jax.value_and_grad(loss, has_aux=True)(params)

  def features(self, params, image):
    return self.model.apply({"params": params}, image, method="image_features")


VOCAB_FILE = "catlip_vocab.json"


class CatLIP(Objective):
  """CatLIP: the image tower and a linear head classify each image's caption labels
  (multi-label binary cross-entropy over the vocabulary's V labels; the text is not read)."""
  batch_keys = ("image", "targets")

  def __init__(self, config: ml_collections.ConfigDict, vocab: catlip_vocab.Vocabulary):
    m = config.model
    self.vocab = vocab
    self.model = catlip.Model(image=tower_config(config, "image"), num_labels=len(vocab),
                              dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype))

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"])["params"]

  def grad_fn(self, params, ema, batch, rng):
    del ema

    def loss(p):
      logits, stats = train_apply(self.model, self._freeze(p), batch["image"],
                                  rngs={"dropout": rng})
      return multilabel_bce_loss(logits, batch["targets"]), _with_stats({}, stats)
    return jax.value_and_grad(loss, has_aux=True)(params)

  def features(self, params, image):
    return self.model.apply({"params": params}, image, method="image_features")

  def transfer_head(self, params, class_names):
    """Each class's row: the mean of the head's rows (kernel columns) and biases of the
    labels of its name's words; zeros for a class none of whose words is a label."""
    head = jax.device_get(params["head"])
    kernel, bias = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    ids = catlip_vocab.class_label_ids(self.vocab, class_names)
    w = np.zeros((kernel.shape[0], len(ids)))
    b = np.zeros(len(ids))
    for c, rows in enumerate(ids):
      if rows:
        w[:, c], b[c] = kernel[:, rows].mean(1), bias[rows].mean()
    return w, b, sum(bool(r) for r in ids)

  def save_or_check(self, workdir):
    path = os.path.join(workdir, VOCAB_FILE)
    if not os.path.exists(path):
      if jax.process_index() == 0:
        self.vocab.save(path)
      return
    saved = catlip_vocab.Vocabulary.load(path)
    if saved.to_json() != self.vocab.to_json():
      diff = sorted(set(saved.labels) ^ set(self.vocab.labels))[:5]
      raise ValueError(f"config.model.catlip: the label vocabulary built now ({len(self.vocab)} "
                       f"labels) differs from the one in {path} ({len(saved)} labels; e.g. "
                       f"{diff or 'the same labels, another order or word map'}): resume with "
                       "that run's config.model.catlip and data, or use another --workdir")


def build_coca(config: ml_collections.ConfigDict, vocab_size: int) -> coca.CoCa:
  """The CoCa model of config.model (towers) and config.coca (decoder, pooler, text ids)."""
  m, c = config.model, config.coca
  image = tower_config(config, "image", pool_type=m.image.pool_type or "none")
  try:
    dims = vit.dims(m.text.variant, decode=text_model.decode_variant,
                    **{k: m.text[k] for k in ("width", "depth", "mlp_dim", "num_heads")})
  except ValueError as e:
    raise ValueError(f"config.model.text.{e}") from None
  runtime = dict(dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype), remat=m.remat,
                 remat_policy=m.remat_policy, attention_impl=m.attention_impl)
  text = dict(dims, vocab_size=vocab_size, pad_id=0, correct_cls_mask=c.correct_cls_mask,
              max_len=config.data.text_len + (c.bos_id is not None), scan=m.scan, **runtime)
  decoder = dict(depth=c.decoder_depth, num_heads=c.decoder_heads or dims["num_heads"],
                 mlp_dim=dims["mlp_dim"])
  return coca.Model(image=image, text=text, decoder=decoder, embed_dim=m.embed_dim,
                    n_queries=c.n_queries, pool_heads=c.pool_heads,
                    bos_id=c.bos_id, itm=c.itm_weight > 0, temperature_init=m.temperature_init,
                    dtype=dtype(m.dtype), param_dtype=dtype(m.param_dtype))


class CoCa(Objective):
  """CoCa: config.coca.contrastive_weight x CLIP loss + caption_weight x teacher-forced
  caption cross-entropy (+ itm_weight x BLIP's image-text matching on hard negatives drawn
  from the contrastive similarities). Zero-shot and retrieval use the contrastive
  embeddings; `captioner` and `itm_scorer` give the evaluator captions and re-ranking."""
  batch_keys = ("image", "text")

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int):
    self.model = build_coca(config, vocab_size)
    self.settings = config.coca
    self.text_len = config.data.text_len

  def init(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])["params"]

  def losses(self, params, batch, rng) -> tuple[jax.Array, dict]:
    """(the weighted total, {'contrastive_loss', 'caption_loss'[, 'itm_loss'], 'scale'})."""
    c, model = self.settings, self.model
    r_drop, r_txt, r_img = jax.random.split(rng, 3)
    kw = dict(train=True, rngs={"dropout": r_drop})
    (zimg, ztxt, out), stats = train_apply(model, params, batch["image"], batch["text"],
                                           rngs={"dropout": r_drop})
    parts = {"contrastive_loss": clip_loss(zimg, ztxt, out["scale"]),
             "caption_loss": caption_loss(out["logits"], out["labels"],
                                          pad_id=model.text["pad_id"],
                                          label_smoothing=c.label_smoothing)}
    total = c.contrastive_weight * parts["contrastive_loss"] + c.caption_weight * parts["caption_loss"]
    if c.itm_weight > 0:
      text = batch["text"]
      # Never a negative: the pair itself, or an identical caption (digits repeat them).
      exclude = (text[:, None, :] == text[None, :, :]).all(-1)
      sim = out["scale"] * zimg @ ztxt.T
      neg_txt = hard_negatives(r_txt, sim, exclude)        # per image, a text
      neg_img = hard_negatives(r_img, sim.T, exclude.T)    # per text, an image
      states, labels, tokens = out["states"], out["labels"], out["image_tokens"]
      _, h_txt = model.apply({"params": params}, states[neg_txt], tokens, method="decode_states",
                             **kw)
      _, h_img = model.apply({"params": params}, states, tokens[neg_img], method="decode_states",
                             **kw)
      hidden = jnp.concatenate([out["hidden"], h_txt, h_img])
      logits = model.apply({"params": params}, hidden,
                           jnp.concatenate([labels, labels[neg_txt], labels]),
                           method="itm_logits")
      n = text.shape[0]
      parts["itm_loss"] = itm_loss(logits, jnp.arange(3 * n) < n)
      total = total + c.itm_weight * parts["itm_loss"]
    return total, _with_stats({**parts, "scale": out["scale"]}, stats)

  def grad_fn(self, params, ema, batch, rng):
    del ema
    return jax.value_and_grad(lambda p: self.losses(self._freeze(p), batch, rng),
                              has_aux=True)(params)

  def features(self, params, image):
    return self.towers()[0](params, image)

  def towers(self):
    return _encoders(self.model)

  def captioner(self, first: int | None = None):
    """gen(params, images [b, H, W, 3]) -> tokens [b, text_len] (the best beam, start token
    dropped, padding after EOS), jitted; the evaluator decodes them. first: the start token
    when the model prepends none (config.coca.bos_id=None: the texts' own, CLIP's SOT)."""
    c = self.settings
    gen = coca.make_generate(self.model, max_len=self.model.text["max_len"], eos_id=c.eos_id,
                             beams=c.eval_beams, length_penalty=c.eval_length_penalty,
                             first=first if c.bos_id is None else c.bos_id)

    def captions(params, image):
      seqs = gen(params, image)[0][:, 0, 1:]
      return seqs[:, :self.text_len] if c.bos_id is not None else seqs
    return captions

  def itm_scorer(self):
    """(image_tokens(params, images) -> [b, n, e], score(params, image_tokens, texts) -> [b])
    for re-ranking retrieval; None without the matching head."""
    if not self.model.itm:
      return None
    model = self.model
    return (lambda p, x: model.apply({"params": p}, x, method="encode_image_tokens")[1],
            lambda p, tok, t: model.apply({"params": p}, tok, t, method="itm_score"))


def make(config: ml_collections.ConfigDict, vocab_size: int, *, mesh: Mesh | None = None,
         batch_axes: tuple[str, ...] = (), converted: dict | None = None,
         label_vocab: catlip_vocab.Vocabulary | None = None) -> Objective:
  """The objective of config.loss (with no frozen params: see Objective.with_frozen);
  converted: a converted checkpoint's model kwargs (two-tower losses only); label_vocab:
  CatLIP's labels (mmjax.data.catlip_vocab.build_vocabulary of the training captions)."""
  if config.loss in CONTRASTIVE:
    return Contrastive(config, vocab_size, mesh=mesh, batch_axes=batch_axes,
                       converted=converted)
  if config.loss == "mae":
    return MAE(config)
  if config.loss == "moco":
    return MoCo(config)
  if config.loss == "catlip":
    if label_vocab is None:
      raise ValueError("config.loss='catlip' needs label_vocab (its caption labels)")
    return CatLIP(config, label_vocab)
  if config.loss == "coca":
    return CoCa(config, vocab_size)
  raise ValueError(f"config.loss must be one of {LOSSES}; got {config.loss!r}")
