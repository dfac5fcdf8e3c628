"""ImageBind-style: an audio tower bound by (image, audio) pairs to the frozen image and text
towers of a siglip_spoken.py run; audio -> text (zero-shot, retrieval) emerges through the
frozen image-text space (the 'audio' evaluator):

  python -m experiments.train --config experiments/configs/bind_spoken.py --workdir /tmp/bind_spoken \
      --config.init_from.workdir=/tmp/siglip_spoken \
      --config.data.shards='/tmp/spoken/train/*.tar' --config.data.eval_shards='/tmp/spoken/test/*.tar'

The baseline that sees (audio, text) pairs instead: bind_spoken_text.py.
"""

from experiments.configs import siglip_spoken

TWO_TOWER = ("img", "img_proj", "txt", "txt_proj")


def get_config():
  c = siglip_spoken.get_config()
  c.loss = "bind"
  c.bind.loss = "siglip"
  c.bind.pairs = (("image", "audio"),)
  c.data.audio_ext = "wav"
  # 1 s clips at 16 kHz (write_spoken_shards(..., clip_seconds=1.0)), 64 mels: 9 x 5 = 45
  # overlapping patches, and a 4-block audio tower, so the recipe fits minutes on a 2-core CPU
  # (ImageBind's 2 s x 128 mels make 228 patches).
  c.data.audio_seconds = 1.0
  c.bind.audio.n_mels = 64
  c.bind.audio.depth = 4
  # The SigLIP run's towers loaded (init_from.workdir on the command line) and frozen; the
  # image-text head t, b is unused by the loss and frozen too: only the audio side learns.
  c.init_from.prefix = TWO_TOWER
  c.frozen = tuple(f"{k}/.*" for k in TWO_TOWER) + ("t", "b")
  return c
