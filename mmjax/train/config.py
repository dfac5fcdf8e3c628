"""The training config: every key with its default, and validation.

Configs are ml_collections ConfigDicts (big_vision style). `defaults()` lists
every key the trainer reads, so a misspelt key in a config file or on the
command line fails at once instead of being silently ignored.
"""

from __future__ import annotations

import math
import os

import ml_collections
from ml_collections.config_dict import placeholder

from mmjax import objectives
from mmjax.data import sources
from mmjax.evaluate import check_evals
from mmjax.losses import BLOCKS
from mmjax.nn.attention import IMPLS as attention_impls
from mmjax.nn.layers import REMAT_POLICIES
from mmjax.numerics import DTYPES

NAN_POLICIES = ("stop", "skip")            # config.nan_policy


def _tower_overrides() -> dict:
  """Override a variant's numbers; unset (None) takes the variant's.

  New placeholders on every call: a placeholder is an ml_collections
  FieldReference, and fields holding the same one are one value (setting
  image.depth would set text.depth too, in every config of the process).
  """
  return dict(width=placeholder(int), depth=placeholder(int), mlp_dim=placeholder(int),
              num_heads=placeholder(int))


def _data_defaults() -> ml_collections.ConfigDict:
  """config.data: what is read and how."""
  return ml_collections.ConfigDict(dict(
      name="mmjax_digits",
      data_dir=placeholder(str),         # None: $MMJAX_DATA_DIR or ~/.cache/mmjax/datasets
      train_split="train",
      eval_split="test",
      image_key="image",
      text_key="text",
      label_key="label",
      image_size=32,
      text_len=16,
      vocab_size=512,         # includes 256 byte-fallback pieces
      # A trained BPE model file ('trained:PATH'); None: trained on the training captions and
      # cached as <data_dir>/<name>/tokenizer-bpe-v<vocab_size>.model.
      tokenizer_path=placeholder(str),
      # A mmjax.data.tokenizers.get_tokenizer spec ('clip', 'sentencepiece:/path.model',
      # 'gemma:/path', 'hf:/tokenizer.json', 'trained:/path.model') in place of the trained
      # one; None: the init_from.checkpoint's own, else the trained sentencepiece.
      tokenizer=placeholder(str),
      augment=True,
      crop_scale_min=0.6,
      flip=False,             # flips turn a 2 into a mirrored 2: off for digits
      num_workers=0,          # grain worker processes decoding and augmenting
      # name='wds': webdataset tar shards (img2dataset's layout), mmjax.data.wds_pipeline.
      # shards / eval_shards: brace ranges '/data/cc3m/{00000..00331}.tar', a glob or a
      # file listing paths; the evaluation shards need captions (retrieval) and, for
      # zero-shot, class labels ('cls') with classnames (a file; None: a classnames.txt
      # beside eval_shards or in their parent folder, CLIP_benchmark's layout).
      shards=placeholder(str),
      eval_shards=placeholder(str),
      classnames=placeholder(str),
      image_ext="jpg;png;webp;jpeg",   # the first of these a sample has is its image
      text_ext="txt",
      label_ext="cls",
      streams=0,              # the global batch's parts, each from its own shards; 0: one per
                              # process (a fixed number makes the batches independent of it)
      shuffle_buffer=2000,    # raw samples shuffled together, per stream and worker
      shard_cycle=4,          # shards each stream (and worker) reads at once, interleaved
      max_skip_fraction=0.5,  # a run whose bad samples and shards exceed this share stops
      # NaFlex image towers (config.model.image.tower='naflex', SigLIP 2): each image at its
      # aspect ratio as up to max_patches patches (mmjax.data.naflex). mode 'pad': one image a
      # row of max_patches tokens, resized to fill it (SigLIP 2's batches); 'pack': each image
      # at most its own patch count, packed into `rows` rows (global, per step) of seq_len
      # tokens, at most max_per_seq a row (NaViT's patch n' pack); too many patches: the
      # largest images shrink. Evaluation: one image a row of eval_max_patches (None:
      # max_patches). image_size is not used.
      # Per-region annotations an objective reads (SigLIP 2's referring expressions): a JSON
      # list of {'box': [x0, y0, x1, y1] in [0, 1], 'text': ...} per record, the TFDS feature
      # regions_key or the webdataset member regions_ext (mmjax.data.scenes writes both).
      regions_key="regions",
      regions_ext="json",
      # Audio beside the images (name='wds' only): the member audio_ext ('wav': PCM, mono, at
      # audio_rate Hz, else skipped as a bad image) as the batch's 'audio' float32 [b, T],
      # T = audio_rate * audio_seconds (cut or zero-padded); None: no audio.
      audio_ext=placeholder(str),
      audio_rate=16000,
      audio_seconds=2.0,
      naflex=dict(mode=placeholder(str), max_patches=256, seq_len=1024, rows=0,
                  max_per_seq=8, eval_max_patches=placeholder(int)),
  ))


def _model_defaults() -> ml_collections.ConfigDict:
  """config.model: the towers, the shared embedding, the runtime settings."""
  return ml_collections.ConfigDict(dict(
      embed_dim=128,
      dtype="float32",        # compute dtype: 'float32' | 'bfloat16'
      param_dtype="float32",
      remat=False,            # recompute each encoder block's activations in the backward pass
      remat_policy=placeholder(str),  # what remat keeps (layers.REMAT_POLICIES); implies remat
      scan=False,             # encoder blocks under nn.scan: params encoder/blocks, a [depth] axis
      attention_impl="auto",  # 'auto' (per platform, when lowered) | 'xla' | 'blockwise' | 'pallas'
      temperature_init=placeholder(float),  # None: CLIP 1/0.07, SigLIP 10
      bias_init=placeholder(float),  # None: SigLIP -10
      # Unset (None) fields take the model's default (vit.ViT, text.TextTransformer:
      # image pool_type 'map', posemb 'sincos2d'; text pool_type 'last', causal False).
      image=dict(variant="Ti/4", pool_type=placeholder(str), posemb=placeholder(str),
                 patch_size=placeholder(int),
                 patch_dropout=0.0,   # FLIP: share of patch tokens dropped at train time
                 # ResNet towers (variant 'RN50' .. 'RN50x64', 'BiT-R50x1': mmjax.models.resnet):
                 # layers, 4 stage depths; norm 'group' | 'batch' (BatchNorm, running
                 # statistics kept) | 'frozen_bn'; width the stem's, num_heads the attention
                 # pool's; pool_type 'attn' | 'gap' | 'none'. With init_from.checkpoint an
                 # open_clip RN's BatchNorm is 'frozen_bn' unless norm says 'batch'.
                 layers=placeholder(tuple), norm=placeholder(str),
                 # 'naflex': a NaFlex ViT (mmjax.models.naflex; config.data.naflex says how
                 # its batches are made); None: chosen by variant (ViT or ResNet).
                 tower=placeholder(str), posemb_grid=placeholder(int),
                 **_tower_overrides()),
      text=dict(variant="Ti", pool_type=placeholder(str), causal=placeholder(bool),
                **_tower_overrides()),
  ))

def defaults() -> ml_collections.ConfigDict:
  """Every config key the trainer understands, with its default value."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128          # global, over all devices and processes
  c.total_steps = 1000
  c.loss = "siglip"           # the objective (mmjax.objectives.names()): 'siglip' | 'clip' (two
                              # towers) | 'mae' | 'moco' | 'catlip' (images) | 'coca' |
                              # 'siglip2' | 'bind' (config.bind: audio bound to the images)
  # LiT: regexes over parameter paths ('img/encoder/block0/attn/query/kernel') that
  # stay as initialised: no gradient computed, no optimizer state, e.g. ('img/.*',).
  c.frozen = ()
  # Start the subtree params[prefix] from another run's newest checkpoint (the
  # same architecture there): e.g. a LiT image tower from an MAE run's 'img'; prefix may
  # be a tuple of top-level keys, e.g. ('img', 'img_proj', 'txt', 'txt_proj'): a
  # SigLIP run's towers for config.loss='bind'.
  # Or start the whole two-tower model from a converted checkpoint:
  # 'big_vision:/path.npz' | 'hf:/dir' | 'open_clip:MODEL_NAME:/path' (mmjax.convert.load).
  # Its architecture, image size and preprocessing, text length and tokenizer replace
  # config.model's towers and config.data's image_size / text_len / tokenizer; config.loss
  # must be its loss. total_steps=0 evaluates it; more steps fine-tune it.
  # init_from.skip: regexes over the prefix's parameter paths ('img/mask_token') that one
  # run has and the other lacks: left as initialised here, or not read from there.
  c.init_from = ml_collections.ConfigDict(dict(workdir=placeholder(str),
                                               # a str or a tuple of str: any type
                                               prefix=ml_collections.FieldReference(
                                                   "img", field_type=object),
                                               checkpoint=placeholder(str), skip=()))
  c.log_every = 20
  # A step whose loss or gradient norm is not finite leaves the state as it was, and
  # 'stop': the run stops there with an error (exit 1), the checkpoints already saved
  # stay; 'skip': training goes on with the next batch (counted as skipped_steps in
  # the metrics) and stops after nan_skip_limit such steps in a row.
  c.nan_policy = "stop"
  c.nan_skip_limit = 10
  # Weight EMA, any objective, in [0, 1); 0 is off. The state keeps params_ema (checkpointed),
  # ema = ema_decay * ema + (1 - ema_decay) * params after each finite step; the final
  # evaluation also runs on it (results keys prefixed 'ema_', e.g. ema_zeroshot_top1).
  c.ema_decay = 0.0
  c.num_devices = -1          # -1: all; a smaller number uses the first N
  # Axis -> size, one -1 taking the rest. The batch is split over both; 'fsdp'
  # also shards large params and optimizer moments.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.sharding = ml_collections.ConfigDict(dict(
      fsdp_min_size=2 ** 14,  # arrays with fewer elements stay replicated
      rules=(),               # ((regex on the state path, 'fsdp' | 'replicate'), ...); default fsdp
  ))
  c.accum_steps = 1           # > 1: contrastive gradient accumulation (GradCache), same gradients
  # Contrastive losses (mmjax.losses): how the global batch is distributed,
  # 'global' (XLA partitions it) | 'gather' | 'ring' | 'ring_bidir' (siglip),
  # the sharded ones over the batch axes; and how each block of logits is
  # computed, 'dense' | 'tiled' (never all in memory) | 'pallas' (kernels).
  c.loss_impl = "global"
  c.loss_blocks = "dense"

  c.data = _data_defaults()

  c.model = _model_defaults()

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-3,
      warmup_steps=100,
      end_lr_fraction=0.01,
      weight_decay=1e-4,      # decoupled (AdamW); never on norms, biases, t, b
      b1=0.9,
      b2=0.95,
      grad_clip=1.0,          # global norm; 0 disables
      # Layer-wise lr decay (BEiT / timm), in (0, 1]; 1 is off. In each transformer tower
      # ('img', 'txt') with L blocks, block i's lr is lr * layer_decay ** (L - i), the
      # embeddings' lr * layer_decay ** (L + 1); the rest (final norm, heads,
      # projections, t, b) keep lr. A ResNet tower counts its residual blocks (timm's
      # grouping): with L blocks in all stages, the stem is depth 0 (lr * decay ** (L + 1)),
      # block k of the flattened stages (stage1_0 = 0, then on through stage 4) depth k + 1
      # (lr * decay ** (L - k)); the attention pool keeps lr.
      layer_decay=1.0,
  ))

  c.evaluate = ml_collections.ConfigDict(dict(
      every=500,              # steps (> 0); 0: only at the end
      batch_size=256,
      templates=placeholder(tuple),  # None: the dataset's own, else ['a photo of a {}.']
      retrieval_match="pair", # 'pair': text i goes with image i; 'label': same class
      probes=True,            # linear probe + kNN on image features (needs data.label_key)
      probe_train_examples=10_000,  # the probe's train set: the first N of data.train_split
      knn_k=20,
      probe_shots=(10,),      # also few-shot linear probes: k labelled examples per class
      at_init=False,          # also evaluate the initial params (init_* in results.json)
  ))
  # big_vision's config.evals: name -> dict(type=<mmjax.evaluate.names()>, every=<steps; 0:
  # only at the end; default evaluate.every>, **config.evaluate keys for it alone), e.g.
  # c.evals.zs = dict(type='zeroshot', every=100, templates=('a {}',)). Empty: the standard
  # set (every evaluator the objective and data allow) every config.evaluate.every. An entry
  # with dataset='wds:/dir' (split=, limit=) evaluates on that set, its metrics '<name>/...'.
  c.evals = ml_collections.ConfigDict()

  c.checkpoint = ml_collections.ConfigDict(dict(every=250, keep=2))

  # Multi-host: unset fields fall back to $MMJAX_COORDINATOR_ADDRESS,
  # $MMJAX_NUM_PROCESSES, $MMJAX_PROCESS_ID; no coordinator = one process.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address=placeholder(str),
      num_processes=placeholder(int),
      process_id=placeholder(int),
      initialization_timeout=300,
      heartbeat_timeout=60,   # seconds before the others give up on a dead process
  ))
  # Each registered objective's own settings (mmjax.objectives: settings_path, e.g.
  # config.model.mae, config.coca), with the defaults its module declares.
  for name in objectives.names():
    cls = objectives.get(name)
    if cls.settings_path:
      *parents, leaf = cls.settings_path.split(".")
      node = c
      for part in parents:
        node = node[part]
      if leaf not in node:
        node[leaf] = ml_collections.ConfigDict(cls.default_settings())
  return c


def _check_keys(cfg, ref, prefix: str) -> None:
  for key in cfg.keys():
    if not prefix and key == "evals":   # named by the user: check_evals checks the entries
      continue
    if key not in ref:
      raise ValueError(f"unknown config key {prefix}{key!r}; known: {sorted(ref.keys())}")
    sub, ref_sub = cfg[key], ref[key]
    if isinstance(ref_sub, (ml_collections.ConfigDict, dict)):
      if not isinstance(sub, (ml_collections.ConfigDict, dict)):
        raise ValueError(f"config.{prefix}{key} must be a dict; got {sub!r}")
      _check_keys(sub, ref_sub, f"{prefix}{key}.")


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


# config.optim's numbers: (low, low inclusive, high, high inclusive), what the range keeps off.
OPTIM_RANGES = {
    "lr": (0, False, math.inf, False, "a zero lr trains nothing, a negative one ascends"),
    "end_lr_fraction": (0, True, 1, True, "the cosine ends at lr * end_lr_fraction"),
    "weight_decay": (0, True, math.inf, False, "a negative one pushes weights away from 0"),
    "b1": (0, True, 1, False, "Adam's bias correction divides by 1 - b ** t"),
    "b2": (0, True, 1, False, "Adam's bias correction divides by 1 - b ** t"),
    "grad_clip": (0, True, math.inf, False, "0 is off; a negative norm flips the update"),
    "layer_decay": (0, False, 1, True, "1 is off"),
}


def _check_optim(optim) -> None:
  """Each OPTIM_RANGES field of config.optim a number in its range (NaN never is)."""
  for key, (lo, lo_in, hi, hi_in, why) in OPTIM_RANGES.items():
    v = optim[key]
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool)
          and (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi))
    if not ok:
      span = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
      raise ValueError(f"config.optim.{key} must be in {span} ({why}); got {v!r}")


def _check_eval_names(evals) -> None:
  """config.evals' names prefix their metrics: non-empty, no whitespace."""
  for name in evals.keys():
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
      raise ValueError(f"config.evals: the name {name!r} must be non-empty without whitespace "
                       "(a metric prefix, e.g. 'zs')")


def _check_naflex(config: ml_collections.ConfigDict) -> None:
  """config.model.image.tower='naflex' and config.data.naflex go together, with sizes that
  fit: ValueError naming the field."""
  n, tower = config.data.naflex, config.model.image.tower
  if (tower == "naflex") != (n.mode is not None):
    raise ValueError(f"config.data.naflex.mode={n.mode!r} with config.model.image.tower="
                     f"{tower!r}: a NaFlex tower takes NaFlex batches ('pad' or 'pack'), and only "
                     "it does")
  if n.mode is None:
    return
  if n.mode not in ("pad", "pack"):
    raise ValueError(f"config.data.naflex.mode must be 'pad' or 'pack'; got {n.mode!r}")
  for key in ("max_patches", "seq_len", "max_per_seq") + (("rows",) if n.mode == "pack" else ()):
    if not isinstance(n[key], int) or isinstance(n[key], bool) or n[key] < 1:
      raise ValueError(f"config.data.naflex.{key} must be a positive int; got {n[key]!r}")
  if n.eval_max_patches is not None and n.eval_max_patches < 1:
    raise ValueError(f"config.data.naflex.eval_max_patches must be a positive int or None; "
                     f"got {n.eval_max_patches!r}")
  if n.mode == "pack" and n.max_patches > n.seq_len:
    raise ValueError(f"config.data.naflex.max_patches={n.max_patches} > seq_len={n.seq_len}: "
                     "an image must fit a row")
  if config.accum_steps != 1 or config.model.image.patch_dropout:
    raise ValueError("config.accum_steps and config.model.image.patch_dropout are not "
                     "supported with NaFlex batches (config.data.naflex.mode)")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field for what can be checked before any data or compile:
  the keys, the objective's and the data source's own rules (Objective.check_config,
  DataSource.check_config), and the rules that cross
  components, each checked here once."""
  _check_keys(config, defaults(), "")
  objective = objectives.get(config.loss)   # ValueError naming config.loss and the choices
  if objective.takes_loss_impl:
    if config.loss_blocks not in BLOCKS:
      raise ValueError(f"config.loss_blocks must be one of {BLOCKS}; got {config.loss_blocks!r}")
    if config.loss_impl == "gather" and config.loss_blocks != "dense":
      raise ValueError(f"config.loss_blocks={config.loss_blocks!r} does not apply to "
                       "config.loss_impl='gather' (its [n, N] logits are dense by design); "
                       "use config.loss_impl='ring'")
  else:
    for key, default in (("loss_impl", "global"), ("loss_blocks", "dense"), ("accum_steps", 1)):
      if config[key] != default:
        raise ValueError(f"config.{key} must be {default!r} for config.loss={config.loss!r} "
                         "(it applies to the contrastive losses, GradCache included); "
                         f"got {config[key]!r}")
  objective.check_config(config)
  _check_naflex(config)
  steps = config.total_steps
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise ValueError(f"config.total_steps must be a non-negative int (0: evaluate only); "
                     f"got {steps!r}")
  if config.init_from.checkpoint and config.init_from.workdir:
    raise ValueError("config.init_from.checkpoint and config.init_from.workdir are both set; "
                     "a run starts from one of them")
  prefix = config.init_from.prefix
  if not (isinstance(prefix, str) and prefix or isinstance(prefix, (tuple, list)) and prefix
          and all(isinstance(p, str) and p for p in prefix)):
    raise ValueError(f"config.init_from.prefix must be a top-level params key or a tuple of "
                     f"them; got {prefix!r}")
  if config.init_from.checkpoint and not objective.takes_checkpoint:
    raise ValueError(f"config.init_from.checkpoint is a two-tower model; config.loss="
                     f"{config.loss!r} does not train one")
  for key in ("batch_size", "log_every", "accum_steps", "nan_skip_limit",
              "checkpoint.every", "checkpoint.keep"):
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"config.{key} must be a positive int; got {value!r}")
  every = config.evaluate.every
  if not isinstance(every, int) or isinstance(every, bool) or every < 0:
    raise ValueError(f"config.evaluate.every must be a positive int, or 0 for only at the end; "
                     f"got {every!r}")
  ema = config.ema_decay
  if not isinstance(ema, (int, float)) or isinstance(ema, bool) or not 0 <= ema < 1:
    raise ValueError(f"config.ema_decay must be in [0, 1) (0: off); got {ema!r}")
  _check_optim(config.optim)
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy must be one of {NAN_POLICIES}; got {config.nan_policy!r}")
  for key in ("dtype", "param_dtype"):
    if config.model[key] not in DTYPES:
      raise ValueError(f"config.model.{key} must be one of {tuple(DTYPES)}; "
                       f"got {config.model[key]!r}")
  if config.model.remat_policy is not None and config.model.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy must be None or one of {REMAT_POLICIES}; "
                     f"got {config.model.remat_policy!r}")
  if config.model.attention_impl not in attention_impls:
    raise ValueError(f"config.model.attention_impl must be one of {attention_impls}; "
                     f"got {config.model.attention_impl!r}")
  sources.get(config.data).check_config(config)
  if config.evaluate.retrieval_match not in ("pair", "label"):
    raise ValueError("config.evaluate.retrieval_match must be 'pair' or 'label'; "
                     f"got {config.evaluate.retrieval_match!r}")
  if not hasattr(config.evals, "items"):
    raise ValueError(f"config.evals must be a dict of name -> dict(type=..., every=...); "
                     f"got {config.evals!r}")
  _check_eval_names(config.evals)
  check_evals(config.evals)


def data_dir(config: ml_collections.ConfigDict) -> str:
  """Where TFDS datasets live: config.data.data_dir, $MMJAX_DATA_DIR or a user cache."""
  return os.path.expanduser(
      config.data.data_dir or os.environ.get("MMJAX_DATA_DIR")
      or "~/.cache/mmjax/datasets")
