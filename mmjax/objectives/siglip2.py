"""SigLIP 2's recipe (issue 32, in progress): the sigmoid loss + LocCa's decoder, and, for the
last `distill_fraction` of training, SILC's local-to-global self-distillation and TIPS' masked
prediction against an EMA teacher.

LocCa's decoder cross-attends to the image tower's unpooled tokens; its vocabulary is the
text's, three task tokens (CAPTION, REF, GROUND) and `box_bins` box-coordinate tokens
(mmjax.losses.distill.box_tokens). Teacher-forced, each position predicting the next token:
  captioning           [CAPTION] caption                 -> the caption
  referring expression [REF] region text [4 box tokens]  -> the box tokens
  grounded captioning  [GROUND] [4 box tokens] region text -> the region text
The regions come from the records' JSON (config.data.regions_key / regions_ext, written by
mmjax.data.scenes), turned into fixed arrays on the host (RegionTargets); refexp_weight and
grounded_weight 0 (the defaults) train captioning only (any image-text data).

The teacher: the student's towers and prototype heads, averaged (teacher_momentum) from the
switch-on step; before it the teacher copies the student, so it starts from the trained model.
The local views: `local_crops` random square crops of `local_crop` of the image's side, resized
back (SILC's local crops); the masked view: `mask_ratio` of the student's patches replaced by
the tower's mask token.

With a NaFlex image tower (config.model.image.tower='naflex', batches in config.data.naflex.mode
'pad': one image a row, padding tokens of segment id 0) the decoder's cross-attention leaves the
padding out (its key mask), the masked view masks valid patches only, and a local view is a
random sub-grid of local_crop of each side of the image's patch grid
(mmjax.models.naflex.crop_grid: a smaller image at the same pixel scale). Boxes are in
normalised image coordinates, which NaFlex's aspect-preserving resize keeps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.data import regions as region_lib
from mmjax.losses import distill
from mmjax.losses.captioning import caption_loss
from mmjax.models import factory, image as image_lib, naflex, siglip2
from mmjax.objectives.base import Context, Objective, encoders, register, vit_patch_tokens
from mmjax.objectives.contrastive import loss_of

TEACHER_KEYS = ("img", "proto_global", "proto_patch")   # what the teacher averages
TASKS = ("caption", "ref", "ground")   # their tokens follow the text vocabulary, in this order


class RegionTargets:
  """A record's regions JSON -> int32 [max_regions, 5 + region_len]: per region its valid flag,
  its 4 box tokens (box_tokens(box, bins, offset)) and its text's tokens (padded); the first
  max_regions regions, the rest rows of zeros. Picklable (grain's workers run it)."""

  def __init__(self, tokenizer, max_regions: int, region_len: int, bins: int, offset: int):
    self.tok, self.max_regions, self.region_len = tokenizer, max_regions, region_len
    self.bins, self.offset = bins, offset

  def __call__(self, regions: str) -> np.ndarray:
    items = region_lib.parse(regions)[:self.max_regions]
    boxes = np.asarray([r["box"] for r in items], np.float32).reshape(-1, 4)
    texts = [r["text"] for r in items]
    out = np.zeros((self.max_regions, 5 + self.region_len), np.int32)
    if items:
      out[:len(items), 0] = 1
      out[:len(items), 1:5] = distill.box_tokens(boxes, self.bins, self.offset)
      out[:len(items), 5:] = self.tok.encode(texts, self.region_len)
    return out


class RecordRegions:
  """A record's regions feature -> RegionTargets' array (an eval field: `reads` it)."""

  def __init__(self, targets: RegionTargets, key: str):
    self.targets, self.key, self.reads = targets, key, (key,)

  def __call__(self, record: dict) -> np.ndarray:
    raw = record[self.key]
    return self.targets(raw.decode() if isinstance(raw, bytes) else str(raw))


def _repeat(key_mask: jax.Array | None, r: int) -> jax.Array | None:
  """[b, n] -> [b * r, n]: each image's row r times (None stays None)."""
  return None if key_mask is None else jnp.repeat(key_mask, r, axis=0)


@register("siglip2")
class Siglip2(Objective):
  """config.siglip2: sigmoid loss + caption_weight x the decoder's caption loss; from step
  distill_start = (1 - distill_fraction) * total_steps, + consistency_weight x SILC +
  masked_weight x TIPS. Zero-shot and retrieval use the two towers, as SigLIP's."""
  settings_path = "siglip2"
  takes_loss_impl = True
  takes_step = True   # the train step passes grad_fn its step (the switch-on)

  @staticmethod
  def default_settings():
    return dict(
        caption_weight=1.0,
        refexp_weight=0.0,        # referring expressions (> 0: the records need regions,
        grounded_weight=0.0,      # as mmjax_digit_scenes'); grounded captioning likewise
        max_regions=4,
        regions_per_image=1,      # each step the decoder trains on this many regions of an
                                  # image (sampled among its valid ones); 0: all max_regions
        region_len=8,             # a region text's tokens
        box_bins=32,
        decoder_depth=2,
        decoder_max_len=ml_collections.config_dict.placeholder(int),   # None: text_len + 1
        distill_fraction=0.2,     # the last 20% of training (SigLIP 2's)
        consistency_weight=1.0,
        masked_weight=0.25,
        prototypes=256,
        teacher_momentum=0.996,
        center_momentum=0.9,
        student_temp=0.1,
        teacher_temp=0.04,
        local_crops=2,
        local_crop=0.5,           # a local view's side, as a share of the image's
        mask_ratio=0.5,
    )

  @classmethod
  def check_config(cls, config):
    s = config.siglip2
    for key in ("caption_weight", "refexp_weight", "grounded_weight", "consistency_weight",
                "masked_weight"):
      if not s[key] >= 0:
        raise ValueError(f"config.siglip2.{key} must be >= 0; got {s[key]!r}")
    for key in ("distill_fraction", "teacher_momentum", "center_momentum"):
      if not 0.0 <= s[key] <= 1.0:
        raise ValueError(f"config.siglip2.{key} must be in [0, 1]; got {s[key]!r}")
    for key in ("local_crop", "mask_ratio"):
      if not 0.0 < s[key] < 1.0:
        raise ValueError(f"config.siglip2.{key} must be in (0, 1); got {s[key]!r}")
    if not (isinstance(s.regions_per_image, int) and 0 <= s.regions_per_image <= s.max_regions):
      raise ValueError(f"config.siglip2.regions_per_image must be an int in [0, max_regions="
                       f"{s.max_regions}]; got {s.regions_per_image!r}")
    for key in ("decoder_depth", "prototypes", "local_crops", "max_regions", "region_len",
                "box_bins"):
      if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
        raise ValueError(f"config.siglip2.{key} must be a positive int; got {s[key]!r}")
    if config.model.image.tower == "naflex" and config.data.naflex.mode == "pack":
      # The decoder pairs each row's tokens with one text; packed rows hold several images.
      raise ValueError("config.data.naflex.mode='pack': siglip2 takes NaFlex batches in mode 'pad'")

  def __init__(self, config: ml_collections.ConfigDict, context: Context):
    s = self.settings = config.siglip2
    base = factory.two_tower_model(config, context.vocab_size, loss="siglip")
    if image_lib.kind(base.image).name not in ("vit", "naflex"):
      raise ValueError(f"config.loss='siglip2' needs a ViT image tower (its patch tokens and "
                       f"mask token) or a NaFlex one; config.model.image is a "
                       f"{image_lib.kind(base.image).name!r}")
    text = dict(base.text)
    # The decoder's vocabulary: the text's, the task tokens, the box tokens.
    v = context.vocab_size
    self.task_ids = {t: v + i for i, t in enumerate(TASKS)}
    self.box_offset = v + len(TASKS)
    self.uses_regions = s.refexp_weight > 0 or s.grounded_weight > 0
    self.tokenizer = context.tokenizer
    self.regions_key = config.data.regions_key
    self.text_len = config.data.text_len
    max_len = max(config.data.text_len, s.region_len + 4) + 1
    decoder = dict(vocab_size=self.box_offset + s.box_bins, max_len=s.decoder_max_len or max_len,
                   width=text["width"], depth=s.decoder_depth, mlp_dim=text["mlp_dim"],
                   num_heads=text["num_heads"])
    self.model = siglip2.Siglip2(
        image=dict(base.image, mask_token=True), text=text, embed_dim=base.embed_dim,
        temperature_init=base.temperature_init, bias_init=base.bias_init,
        image_proj=base.image_proj, text_proj=base.text_proj, dtype=base.dtype,
        param_dtype=base.param_dtype, decoder=decoder, prototypes=s.prototypes)
    self.sigmoid = loss_of("siglip", config.loss_impl, config.loss_blocks, mesh=context.mesh,
                           axes=context.batch_axes)
    self.pad_id = text.get("pad_id", 0)
    self.start = int(round((1.0 - s.distill_fraction) * config.total_steps))

  @property
  def batch_keys(self):
    return ("image", "text", "regions") if self.uses_regions else ("image", "text")

  def region_fields(self):
    if not self.uses_regions:
      return {}
    if self.tokenizer is None:
      raise ValueError("config.loss='siglip2' with region losses needs the run's tokenizer "
                       "(objectives.Context.tokenizer)")
    s = self.settings
    return {"regions": RegionTargets(self.tokenizer, s.max_regions, s.region_len, s.box_bins,
                                     self.box_offset)}

  def eval_fields(self):
    """'regions' (the referring expressions') from records with regions, when the region
    tasks are trained."""
    if self.uses_regions and self.tokenizer is not None:
      return {"regions": RecordRegions(self.region_fields()["regions"], self.regions_key)}
    return {}

  def patch_features(self):
    return vit_patch_tokens(self.model)

  def greedy(self, variables, seq: jax.Array, image_tokens: jax.Array, steps: int,
             lo: int, hi: int, key_mask: jax.Array | None = None) -> jax.Array:
    """seq [b, s] (a task token and its prompt) + `steps` tokens decoded greedily among ids
    [lo, hi), cross-attending to image_tokens [b, n, w] (those of key_mask [b, n] bool, None:
    all): [b, s + steps] (the decoder rerun over the whole prefix each step: steps are few)."""
    for _ in range(steps):
      logits = self.model.apply(variables, seq, image_tokens, key_mask,
                                method="decode")[:, -1, lo:hi]
      seq = jnp.concatenate([seq, (jnp.argmax(logits, -1) + lo)[:, None].astype(seq.dtype)], 1)
    return seq

  def refexp_predictor(self):
    """(fn(variables, {'image', 'regions'}) -> box tokens [b, R, 4], bins, offset): each
    region's box decoded greedily from [REF] + its text, among the box tokens."""
    if not self.uses_regions:
      return None
    s, model = self.settings, self.model
    lo, hi = self.box_offset, self.box_offset + s.box_bins

    def predict(variables, image, regions):
      _, tokens = model.apply(variables, image, method="image_outputs")
      b, r, _ = regions.shape
      rows = regions.reshape(b * r, -1)
      seq = jnp.concatenate([jnp.full((b * r, 1), self.task_ids["ref"], rows.dtype),
                             rows[:, 5:]], 1)
      seq = self.greedy(variables, seq, jnp.repeat(tokens, r, axis=0), 4, lo, hi,
                        _repeat(naflex.valid_tokens(image), r))
      return seq[:, -4:].reshape(b, r, 4)

    return (lambda v, batch: predict(v, batch["image"], batch["regions"])), s.box_bins, lo

  def captioner(self, first=None):
    """Captions [b, text_len] decoded greedily from [CAPTION] among the text's tokens (first,
    the tokenizer's start token, is unused: the task token starts every caption)."""
    del first
    model = self.model

    def captions(variables, image):
      _, tokens = model.apply(variables, image, method="image_outputs")
      seq = jnp.full((tokens.shape[0], 1), self.task_ids["caption"], jnp.int32)
      return self.greedy(variables, seq, tokens, self.text_len, 0, self.task_ids["caption"],
                         naflex.valid_tokens(image))[:, 1:]
    return jax.jit(captions)

  def sample_regions(self, rng: jax.Array, regions: jax.Array) -> jax.Array:
    """regions [b, R, ...] -> [b, k, ...]: per image k = regions_per_image distinct regions,
    uniformly among its valid ones (invalid ones fill in where it has fewer); all for k = 0."""
    k = self.settings.regions_per_image
    if k == 0 or k == regions.shape[1]:
      return regions
    score = jax.random.uniform(rng, regions.shape[:2]) + (regions[..., 0] > 0)   # valid first
    _, pick = jax.lax.top_k(score, k)                                            # [b, k]
    return jnp.take_along_axis(regions, pick[..., None], axis=1)

  def region_sequences(self, regions: jax.Array) -> dict:
    """regions [b, R, 5 + Lr] (RegionTargets') -> {'ref', 'ground'}: (inputs [b * R, Lr + 4],
    labels [b * R, Lr + 4]), labels the pad id except at the targets (the box tokens; the
    region text's tokens) of valid regions."""
    b, r, _ = regions.shape
    regions = regions.reshape(b * r, -1)
    valid, box, words = regions[:, :1] > 0, regions[:, 1:5], regions[:, 5:]
    task = lambda name: jnp.full((b * r, 1), self.task_ids[name], regions.dtype)
    pad = lambda x: jnp.full_like(x, self.pad_id)
    ref = jnp.concatenate([task("ref"), words, box], 1)
    ref_target = jnp.concatenate([pad(words), box], 1)
    ground = jnp.concatenate([task("ground"), box, words], 1)
    ground_target = jnp.concatenate([pad(box), words], 1)
    keep = lambda labels: jnp.where(valid, labels, self.pad_id)
    return {"ref": (ref[:, :-1], keep(ref_target)),
            "ground": (ground[:, :-1], keep(ground_target))}

  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["image"], batch["text"])

  def ema_init(self, params):
    k = self.settings.prototypes
    return {"teacher": {key: params[key] for key in TEACHER_KEYS},
            "center_global": jnp.zeros((k,), jnp.float32),
            "center_patch": jnp.zeros((k,), jnp.float32)}

  def ema_update(self, ema, params, step):
    # Before the switch-on the teacher copies the student; then it averages it.
    m = jnp.where(step >= self.start, self.settings.teacher_momentum, 0.0)
    teacher = jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema["teacher"],
                           {key: params[key] for key in TEACHER_KEYS})
    return {**ema, "teacher": teacher}

  def caption_inputs(self, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(decoder input [b, L + 1]: CAPTION then the caption, labels [b, L + 1]: the caption
    then a pad): teacher forcing, each position predicting the next token."""
    b = text.shape[0]
    task = jnp.full((b, 1), self.task_ids["caption"], text.dtype)
    pad = jnp.full((b, 1), self.pad_id, text.dtype)
    return jnp.concatenate([task, text], 1), jnp.concatenate([text, pad], 1)

  def local_views(self, rng: jax.Array, image):
    """[v, b, H, W, 3]: v random square crops of local_crop of the side, resized to H x W; for
    a NaFlex input, its keys with leading [v, b]: v random sub-grids (naflex.crop_grid)."""
    s = self.settings
    if isinstance(image, dict):
      views = [naflex.crop_grid(image, r, s.local_crop)
               for r in jax.random.split(rng, s.local_crops)]
      return jax.tree.map(lambda *x: jnp.stack(x), *views)
    b, h, w, c = image.shape
    side = max(1, int(round(s.local_crop * min(h, w))))

    def one(r, im):
      ry, rx = jax.random.split(r)
      y = jax.random.randint(ry, (), 0, h - side + 1)
      x = jax.random.randint(rx, (), 0, w - side + 1)
      crop = jax.lax.dynamic_slice(im, (y, x, 0), (side, side, c))
      return jax.image.resize(crop, (h, w, c), "bilinear")

    keys = jax.random.split(rng, s.local_crops * b).reshape(s.local_crops, b, -1)
    return jax.vmap(jax.vmap(one))(keys, jnp.broadcast_to(image, (s.local_crops, *image.shape)))

  def masked_patches(self, rng: jax.Array, image, n: int | None = None) -> jax.Array:
    """[b, n] bool: each patch masked with probability mask_ratio (n: a ViT's patch tokens); a
    NaFlex input's valid tokens only ([b, L], padding never masked nor predicted)."""
    valid = naflex.valid_tokens(image)
    shape = valid.shape if valid is not None else (image.shape[0], n)
    mask = jax.random.uniform(rng, shape) < self.settings.mask_ratio
    return mask if valid is None else jnp.logical_and(mask, valid)

  def distill_losses(self, params, ema, image, rng) -> dict:
    """{'consistency_loss', 'masked_loss', 'center_global', 'center_patch'} of a batch."""
    s, model = self.settings, self.model
    r_views, r_mask, r_drop = jax.random.split(rng, 3)
    teacher = jax.lax.stop_gradient({**params, **ema["teacher"]})
    t_pooled, t_tokens = model.apply({"params": teacher}, image, method="image_outputs")
    t_global, t_patch = model.apply({"params": teacher}, t_pooled, t_tokens,
                                    method="prototype_logits")
    views = self.local_views(r_views, image)
    v, b = jax.tree.leaves(views)[0].shape[:2]
    flat = jax.tree.map(lambda x: x.reshape(v * b, *x.shape[2:]), views)
    pooled, _ = model.apply({"params": params}, flat, method="image_outputs")
    s_global, _ = model.apply({"params": params}, pooled, jnp.zeros((v * b, 1, pooled.shape[-1])),
                              method="prototype_logits")
    valid = naflex.valid_tokens(image)   # None for a ViT: every patch
    mask = self.masked_patches(r_mask, image, t_tokens.shape[1])
    _, m_tokens = model.apply({"params": params}, image, mask=mask, method="image_outputs")
    _, s_patch = model.apply({"params": params}, pooled[:b], m_tokens, method="prototype_logits")
    temps = dict(student_temp=s.student_temp, teacher_temp=s.teacher_temp)
    return {
        "consistency_loss": distill.consistency_loss(
            s_global.reshape(v, b, -1), t_global, ema["center_global"], **temps),
        "masked_loss": distill.masked_prediction_loss(s_patch, t_patch, mask, ema["center_patch"],
                                                      **temps),
        "center_global": distill.update_center(ema["center_global"], t_global, s.center_momentum),
        "center_patch": distill.update_center(ema["center_patch"], t_patch, s.center_momentum,
                                              where=valid)}

  def losses(self, params, ema, batch, rng, step) -> tuple[jax.Array, dict]:
    """(the weighted total, its parts and the new teacher centers under 'ema')."""
    s, model = self.settings, self.model
    r_drop, r_distill, r_regions = jax.random.split(rng, 3)
    image, text = batch["image"], batch["text"]
    zimg, ztxt, out, tokens = model.apply({"params": params}, image, text, train=True,
                                          rngs={"dropout": r_drop}, method="train_outputs")
    parts = {"sigmoid_loss": self.sigmoid(zimg, ztxt, out)}
    key_mask = naflex.valid_tokens(image)   # a NaFlex row's padding: not cross-attended to
    inputs, labels = self.caption_inputs(text)
    logits = model.apply({"params": params}, inputs, tokens, key_mask, method="decode")
    parts["caption_loss"] = caption_loss(logits, labels, pad_id=self.pad_id)
    total_locca = s.caption_weight * parts["caption_loss"]
    if self.uses_regions:
      regions = self.sample_regions(r_regions, batch["regions"])
      per_region = jnp.repeat(tokens, regions.shape[1], axis=0)   # [b * k, n, w]
      region_mask = _repeat(key_mask, regions.shape[1])
      sequences = self.region_sequences(regions)
      for name, weight in (("ref", s.refexp_weight), ("ground", s.grounded_weight)):
        inputs, labels = sequences[name]
        logits = model.apply({"params": params}, inputs, per_region, region_mask,
                             method="decode")
        parts[f"{name}_loss"] = caption_loss(logits, labels, pad_id=self.pad_id)
        total_locca = total_locca + weight * parts[f"{name}_loss"]
    on = (step >= self.start).astype(jnp.float32)
    # Before the switch-on the distillation is not computed at all (most of training).
    off = {"consistency_loss": jnp.zeros(()), "masked_loss": jnp.zeros(()),
           "center_global": ema["center_global"], "center_patch": ema["center_patch"]}
    d = jax.lax.cond(step >= self.start,
                     lambda: self.distill_losses(params, ema, image, r_distill), lambda: off)
    parts.update(consistency_loss=d["consistency_loss"], masked_loss=d["masked_loss"],
                 distill_on=on)
    total = (parts["sigmoid_loss"] + total_locca
             + on * (s.consistency_weight * d["consistency_loss"]
                     + s.masked_weight * d["masked_loss"]))
    centers = {k: jnp.where(on > 0, d[k], ema[k]) for k in ("center_global", "center_patch")}
    return total, {**parts, "scale": out["scale"], "ema": centers}

  def grad_fn(self, params, ema, batch, rng, batch_stats=None, step=0):
    del batch_stats
    return jax.value_and_grad(
        lambda p: self.losses(self._freeze(p), ema, batch, rng, step), has_aux=True)(params)

  def features(self, variables, image):
    return self.towers()[0](variables, image)

  def towers(self):
    return encoders(self.model)
