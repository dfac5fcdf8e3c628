"""SigLIP with CLIP's modified ResNet as the image tower, on the embedded handwritten digits.

  python -m experiments.train --config experiments/configs/resnet_siglip_digits.py --workdir /tmp/rn

A four-block ResNet (one bottleneck per stage, stem width 32: 1,024 features, pooled by
attention to embed_dim); 'RN50' .. 'RN50x64' are the same tower at CLIP's sizes. GroupNorm;
`--config.model.image.norm=batch` trains it with BatchNorm, as CLIP did.
"""

from experiments.configs import siglip_digits


def get_config():
  c = siglip_digits.get_config()
  c.total_steps = 400
  c.model.image.variant = None
  c.model.image.layers = (1, 1, 1, 1)
  c.model.image.width = 32
  c.model.image.num_heads = 8
  c.model.image.depth = None
  c.model.image.norm = "group"
  return c
