"""MoCo v3 on the embedded digits: two crops of an image agree, others differ (images only).

  python -m experiments.train --config experiments/configs/moco_digits.py --workdir workdirs/moco
"""

from mmjax.train.config import defaults


def get_config():
  c = defaults()
  c.loss = "moco"
  c.batch_size = 128
  c.total_steps = 600
  c.log_every = 50
  c.model.image.variant = "Ti/8"   # 16 patches: two views x (online + momentum) per step
  c.model.image.depth = 4
  c.model.image.pool_type = "gap"
  c.model.moco.temperature = 0.2
  c.model.moco.momentum = 0.99
  c.data.crop_scale_min = 0.3     # two views need to differ
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 50
  c.evaluate.every = 200
  c.evaluate.at_init = True
  c.checkpoint.every = 200
  return c
