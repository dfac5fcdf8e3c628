"""SigLIP on the spoken-digit shards' images and captions (the first half of the binding recipe;
the audio members are not read). Write the shards, then train:

  python -c "from mmjax.data import spoken; spoken.write_spoken_shards('/tmp/spoken', clip_seconds=1.0)"
  python -m experiments.train --config experiments/configs/siglip_spoken.py --workdir /tmp/siglip_spoken \
      --config.data.shards='/tmp/spoken/train/*.tar' --config.data.eval_shards='/tmp/spoken/test/*.tar'

Then experiments/configs/bind_spoken.py binds audio to its frozen towers.
"""

from experiments.configs import siglip_digits


def get_config():
  c = siglip_digits.get_config()   # the digits' towers, batch, steps and label-level retrieval
  c.data.name = "wds"   # shards, classnames.txt beside them: --config.data.shards / eval_shards
  return c
