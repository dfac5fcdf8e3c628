"""MAE on the embedded digits: a ViT learns by filling in 75% of the patches (images only).

  python -m experiments.train --config experiments/configs/mae_digits.py --workdir workdirs/mae

Its image tower ('img') is the starting point of lit_digits.py. Linear-probe and
kNN accuracy on the held-out digits are measured at init and at the end.
"""

from mmjax.train.config import defaults


def get_config():
  c = defaults()
  c.loss = "mae"
  c.batch_size = 128
  c.total_steps = 600
  c.log_every = 50
  c.model.image.variant = "Ti/4"   # 64 patches of 4x4 pixels (one scan pixel each)
  c.model.image.depth = 4
  c.model.image.pool_type = "gap"  # no pooling head: the LiT tower reuses the tree as is
  c.model.mae.mask_ratio = 0.75
  c.model.mae.decoder_depth = 2
  c.data.crop_scale_min = 0.6
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 50
  c.evaluate.every = 200
  c.evaluate.at_init = True
  c.checkpoint.every = 200
  return c
