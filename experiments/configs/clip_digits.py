"""CLIP (softmax loss, causal text tower) on the embedded handwritten digits."""

from experiments.configs import siglip_digits


def get_config():
  c = siglip_digits.get_config()
  c.loss = "clip"
  c.model.text.causal = True
  c.model.text.pool_type = "eos"
  return c
