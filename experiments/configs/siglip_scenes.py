"""SigLIP alone on the digit scenes (mmjax.data.scenes): the baseline of siglip2_scenes.py,
with the same towers, data, steps and evaluations (zero-shot of the largest digit, retrieval,
the linear and dense probes).

  python -m experiments.train --config experiments/configs/siglip_scenes.py --workdir /tmp/siglip_scenes
"""

from mmjax.train.config import defaults


def get_config():
  c = defaults()
  c.loss = "siglip"
  c.batch_size = 64
  c.total_steps = 600
  c.optim.lr = 5e-4               # the lowest loss at step 600 of 2.5e-4 .. 3e-3 (docs/recipes.md)
  c.data.name = "mmjax_digit_scenes"
  c.data.image_size = 48          # a 64 x 40 scene squashed: its digits keep 6-12 px
  c.data.augment = False          # the boxes hold only without random crops (and flips)
  c.model.image.variant = "Ti/8"  # 36 patches
  c.model.image.depth = 4
  c.model.text.variant = "Ti"
  c.model.text.depth = 2
  c.model.embed_dim = 128
  c.evaluate.every = 0            # at the end only
  c.evaluate.probe_train_examples = 500   # also the dense probe's patches (500 x 36)
  c.evaluate.probe_shots = ()
  return c
