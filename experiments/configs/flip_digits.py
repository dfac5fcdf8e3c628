"""FLIP on the embedded digits: SigLIP whose image tower sees a random half of its patches.

  python -m experiments.train --config experiments/configs/flip_digits.py --workdir workdirs/flip

The image tower is Ti/4 (64 patches of the 32x32 image, 4 layers), where the
image tokens dominate the step and dropping half of them pays; with the main
job's Ti/8 (16 patches) the text tower and the fixed costs are a larger share.
`python -m benchmarks.flip --config experiments/configs/flip_digits.py --train`
compares it with patch_dropout=0.
"""

from experiments.configs import siglip_digits


def get_config():
  c = siglip_digits.get_config()
  c.model.image.variant = "Ti/4"
  c.model.image.patch_dropout = 0.5
  return c
