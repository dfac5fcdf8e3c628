"""The referring-expression probe of siglip_scenes.py / siglip2_scenes.py: another run's image
tower, frozen, under a fresh LocCa decoder trained for 300 steps on captioning, referring
expressions and grounded captioning (no distillation). The same probe for both runs measures
how well their patch tokens localise, whether or not the run had a decoder of its own.

  python -m experiments.train --config experiments/configs/siglip2_probe.py \
      --workdir /tmp/probe_siglip --config.init_from.workdir=/tmp/siglip_scenes
"""

from experiments.configs import siglip2_scenes


def get_config():
  c = siglip2_scenes.get_config()
  c.total_steps = 300
  c.siglip2.distill_fraction = 0.0
  c.frozen = ("img/.*", "txt/.*")         # the decoder (and img_proj, t, b) train
  c.init_from.prefix = "img"
  c.init_from.skip = ("img/mask_token",)   # a SigLIP run has none; unused without distillation
  return c
