"""open_clip as a peer for parity tests; the caller's tests skip (with the reason) without it."""

import sys
import types

import pytest


def _patch_torchvision():
  """Lets open_clip and transformers import next to a torchvision built for another torch;
  torch on one thread (the other xdist worker's XLA has the other core)."""
  try:
    import torch
    torch.set_num_threads(1)
  except ImportError:
    pass
  try:
    import torchvision  # noqa: F401
  except ImportError:
    pass   # then open_clip's import below fails and skips
  except RuntimeError as e:
    # A CPU torch next to a torchvision built for another torch fails with "operator
    # torchvision::nms does not exist" while registering kernels for torchvision's own
    # ops; open_clip uses none of them, so skip those registrations.
    if "does not exist" not in str(e):
      raise
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
      del sys.modules[name]
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
      sys.modules[name] = types.ModuleType(name)


def import_open_clip():
  """open_clip, or pytest.skip when torch / open_clip are not installed."""
  pytest.importorskip("torch", reason="open_clip parity needs torch: pip install -e '.[test]'")
  _patch_torchvision()
  return pytest.importorskip("open_clip", reason="the parity tests need open-clip-torch: "
                             "pip install -e '.[test]'")


def import_transformers():
  """transformers, or pytest.skip when torch / transformers are not installed."""
  pytest.importorskip("torch", reason="the HF parity tests need torch: pip install -e '.[test]'")
  _patch_torchvision()
  return pytest.importorskip("transformers", reason="the HF parity tests need transformers: "
                             "pip install -e '.[test]'")


def save_tiny_hf_clip(path, seed: int = 0):
  """A small random transformers CLIPModel (CLIP's 49408-id vocabulary, so its tokenizer is
  'clip'; 32 px images, 16 tokens, 2 layers of width 32) saved with save_pretrained."""
  transformers = import_transformers()
  import torch
  torch.manual_seed(seed)
  cfg = transformers.CLIPConfig(
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=16),
      projection_dim=16)
  transformers.CLIPModel(cfg).save_pretrained(path)
  return path
