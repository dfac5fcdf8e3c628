"""SigLIP 2's recipe on the digit scenes (several digits a picture, boxes, region texts): the
sigmoid loss + LocCa's captioning, referring expressions and grounded captioning, and SILC +
TIPS self-distillation for the last 20% of training. Compare with siglip_scenes.py (SigLIP
alone, the same budget): docs/recipes.md.

  python -m experiments.train --config experiments/configs/siglip2_scenes.py --workdir /tmp/siglip2
"""

from experiments.configs import siglip_scenes


def get_config():
  c = siglip_scenes.get_config()
  c.loss = "siglip2"
  c.siglip2.refexp_weight = 1.0
  c.siglip2.grounded_weight = 1.0
  return c
