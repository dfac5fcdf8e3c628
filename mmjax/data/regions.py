"""A record's regions: the objects in its image, as a JSON list
[{"box": [x0, y0, x1, y1], "text": str, "label": int}, ...] (boxes in normalised image
coordinates, x right, y down; "label" optional), the form mmjax.data.scenes writes. They feed
SigLIP 2's region losses (config.data.regions_key / regions_ext) and the dense probe's
per-patch labels.
"""

from __future__ import annotations

import json

import numpy as np

MAX_REGIONS = 16   # region_boxes keeps the first 16 regions of a record


def parse(regions: str | bytes) -> list[dict]:
  """The regions JSON -> [{'box': (x0, y0, x1, y1) floats, 'text': str, 'label': int or -1}];
  ValueError (quoting the start of the text) when it is not that list."""
  text = regions.decode("utf-8", "replace") if isinstance(regions, bytes) else str(regions)
  try:
    items = json.loads(text)
    out = [{"box": tuple(float(v) for v in r["box"]), "text": str(r.get("text", "")),
            "label": int(r.get("label", -1))} for r in items]
    if any(len(r["box"]) != 4 for r in out):
      raise ValueError("a box is not 4 numbers")
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"regions JSON: a list of {{'box': [x0, y0, x1, y1], 'text': ..., "
                     f"'label': ...}} ({type(e).__name__}: {e}); got {text[:80]!r}") from None
  return out


def region_boxes(regions: str | bytes, max_regions: int = MAX_REGIONS) -> np.ndarray:
  """The regions JSON -> float64 [max_regions, 5]: each region's (label, x0, y0, x1, y1), the
  first max_regions regions; rows past the last region (and a region without a label) have
  label -1."""
  out = np.zeros((max_regions, 5), np.float64)
  out[:, 0] = -1
  for i, r in enumerate(parse(regions)[:max_regions]):
    out[i] = (r["label"], *r["box"])
  return out


def patch_labels(boxes: np.ndarray, grid: int) -> np.ndarray:
  """region_boxes rows [..., R, 5] -> int32 [..., grid * grid]: per patch of a grid x grid
  image (row-major), 1 + the label of the first labelled region whose box holds the patch's
  centre, 0 (background) where none does."""
  boxes = np.asarray(boxes, np.float64)
  centre = (np.arange(grid) + 0.5) / grid
  y, x = (c.reshape(-1) for c in np.meshgrid(centre, centre, indexing="ij"))   # [g*g]
  label, x0, y0, x1, y1 = (boxes[..., k, None] for k in range(5))               # [..., R, 1]
  inside = (label >= 0) & (x0 <= x) & (x < x1) & (y0 <= y) & (y < y1)           # [..., R, g*g]
  first = np.argmax(inside, axis=-2)                                             # [..., g*g]
  hit = np.take_along_axis(inside, first[..., None, :], axis=-2)[..., 0, :]
  got = np.take_along_axis(np.broadcast_to(label, inside.shape), first[..., None, :],
                           axis=-2)[..., 0, :]
  return np.where(hit, got + 1, 0).astype(np.int32)
