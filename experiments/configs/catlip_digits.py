"""CatLIP on the embedded digits: the ViT classifies each image's caption words (no text tower).

  python -m experiments.train --config experiments/configs/catlip_digits.py --workdir workdirs/catlip

The labels are the training captions' content words (mmjax.data.catlip_vocab): the class
word or numeral of each caption ('three', '3') and the template words ('handwritten',
'scan', ...). scikit-learn's stop-word list holds 'one' .. 'nine' but for 'seven';
keep_words puts the number words back. Linear-probe, 10-shot and kNN accuracy are measured
at init and at the end, and CatLIP's transfer step: a digit classifier made of the head's
rows for the class names 'zero' .. 'nine' (transfer_top1), then 100 gradient steps on 10
examples per class from it or from zeros.
"""

from mmjax.data.digits import CLASS_NAMES
from mmjax.train.config import defaults


def get_config():
  c = defaults()
  c.loss = "catlip"
  c.batch_size = 128
  c.total_steps = 600
  c.log_every = 50
  c.model.image.variant = "Ti/8"   # 16 patches of 8x8 pixels
  c.model.image.depth = 4
  c.model.image.pool_type = "gap"  # the tree a LiT tower reuses as is
  c.model.catlip.keep_words = tuple(CLASS_NAMES)
  c.model.catlip.min_count = 5
  c.data.crop_scale_min = 0.6
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 50
  c.evaluate.every = 200
  c.evaluate.at_init = True
  c.checkpoint.every = 200
  return c
