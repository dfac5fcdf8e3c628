"""The baseline for bind_spoken.py: the same audio tower, steps and frozen SigLIP towers, trained
directly on (text, audio) pairs (the captions as the anchor), so its audio -> text metrics are
what supervision gives and bind_spoken's what binding through images gives:

  python -m experiments.train --config experiments/configs/bind_spoken_text.py \
      --workdir /tmp/bind_spoken_text --config.init_from.workdir=/tmp/siglip_spoken \
      --config.data.shards='/tmp/spoken/train/*.tar' --config.data.eval_shards='/tmp/spoken/test/*.tar'
"""

from experiments.configs import bind_spoken


def get_config():
  c = bind_spoken.get_config()
  c.bind.pairs = (("text", "audio"),)
  return c
