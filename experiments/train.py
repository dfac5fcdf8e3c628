r"""Trains a two-tower model from a config file.

  python -m experiments.train --config experiments/configs/siglip_digits.py \
      --workdir /tmp/siglip_digits [--config.total_steps=2000 ...]

Re-running with the same --workdir resumes from the newest checkpoint that restores; a
finished workdir is reported (step N of N, where its results are) and left as it is.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmjax import hostmem

config_flags.DEFINE_config_file("config", None, "Path to a config file (.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics, plots and results go here.")
flags.mark_flags_as_required(["config", "workdir"])


def _config_file(argv) -> str | None:
  """The --config path of argv (without config_flags' ':arg' suffix), if given."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":")[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def parse_flags(argv):
  """absl's parsing, with a bad --config.* override or a missing config file
  reported as one line, not a traceback."""
  path = _config_file(argv)
  if path is not None and not os.path.isfile(path):
    sys.exit(f"mmjax: error: --config {path!r}: no such file (working directory {os.getcwd()})")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    msg = str(e).replace("\\n", "\n").splitlines()[0].strip("\"'\\ ")
    if isinstance(e, AttributeError):
      msg = f"unknown config key {msg!r}"
    sys.exit(f"mmjax: error: {msg} (overrides: {' '.join(bad) or 'none'})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from mmjax.data import pipeline   # after flag parsing: a bad flag fails fast
  from mmjax.train import loop
  pipeline.quiet_tfds_noise()
  try:
    loop.train(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, loop.NonFiniteError) as e:
    # Config and data errors are raised before compiling and name the field; a
    # non-finite step names the step: one line, no trace, exit status 1.
    sys.exit(f"mmjax: error: {e}")


if __name__ == "__main__":
  hostmem.keep_freed_memory()   # process-wide malloc tuning, before JAX starts: mmjax/hostmem.py
  app.run(main, flags_parser=parse_flags)
