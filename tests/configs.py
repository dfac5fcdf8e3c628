"""Configs for the tests (importing this module does not touch JAX's device setup)."""


def tiny_config(data_dir: str, **overrides):
  """A seconds-long config: mu-sized towers on the digits."""
  from experiments.configs import siglip_digits
  c = siglip_digits.get_config()
  c.data.data_dir = data_dir
  c.num_devices = 1
  c.batch_size = 16
  c.total_steps = 12
  c.log_every = 1
  c.optim.warmup_steps = 2
  c.checkpoint.every = 4
  c.evaluate.every = 0
  c.evaluate.batch_size = 128
  # The linear/kNN probes (embedding the 1,437 training images, L-BFGS, kNN) are ~25% of a tiny
  # run: off unless a test asks (test_train_writes_results_metrics_plot, the LiT run).
  c.evaluate.probes = False
  c.model.image.variant = "mu/8"
  c.model.image.depth = None
  c.model.text.variant = "mu"
  c.model.text.depth = None
  c.model.embed_dim = 16
  c.model.dtype = "float32"
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c
