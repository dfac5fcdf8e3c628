"""CoCa (contrastive + captioning, BLIP's matching head) on the embedded handwritten digits.

  python -m experiments.train --config experiments/configs/coca_digits.py --workdir /tmp/coca
"""

from experiments.configs import siglip_digits


def get_config():
  c = siglip_digits.get_config()
  c.loss = "coca"
  c.total_steps = 300                # the decoder and the matching head make a step ~2-3x SigLIP's
  c.optim.warmup_steps = 50
  c.model.image.pool_type = "none"   # the CoCa pooler reads every token
  c.coca.n_queries = 17              # 1 contrastive query + 16 image tokens (16 patches)
  c.coca.decoder_depth = 2
  c.coca.itm_weight = 1.0
  c.coca.rerank_k = 8
  c.evaluate.every = 0               # at the end only (captioning the eval split costs)
  return c
