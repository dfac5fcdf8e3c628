"""LiT on the embedded digits: a text tower learns to match a locked, MAE-pretrained image tower.

Two steps (the second needs the first's workdir):

  python -m experiments.train --config experiments/configs/mae_digits.py --workdir workdirs/mae
  python -m experiments.train --config experiments/configs/lit_digits.py --workdir workdirs/lit \
      --config.init_from.workdir=workdirs/mae
"""

from mmjax.train.config import defaults


def get_config():
  c = defaults()
  c.loss = "siglip"
  c.batch_size = 128
  c.total_steps = 600
  # The image tower must be mae_digits.py's: same variant, depth, pooling, posemb.
  c.model.image.variant = "Ti/4"
  c.model.image.depth = 4
  c.model.image.pool_type = "gap"
  c.model.text.variant = "Ti"
  c.model.text.depth = 2
  c.model.embed_dim = 128
  c.frozen = ("img/.*",)           # locked image tower; img_proj, the text tower, t, b train
  c.init_from.prefix = "img"
  c.evaluate.every = 200
  c.evaluate.retrieval_match = "label"
  return c
