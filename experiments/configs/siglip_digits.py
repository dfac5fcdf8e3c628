"""SigLIP on the embedded handwritten digits: the default main job (CPU, minutes).

  python -m experiments.train --config experiments/configs/siglip_digits.py --workdir /tmp/siglip
"""

from mmjax.train.config import defaults


def get_config():
  c = defaults()
  c.loss = "siglip"
  c.batch_size = 128
  c.total_steps = 600
  c.data.name = "mmjax_digits"
  c.model.image.variant = "Ti/8"  # 16 patches of the 32x32 image
  c.model.image.depth = 4
  c.model.text.variant = "Ti"
  c.model.text.depth = 2
  c.model.embed_dim = 128
  c.evaluate.every = 100
  c.evaluate.retrieval_match = "label"  # ten classes: a caption is right for every image of its digit
  return c
