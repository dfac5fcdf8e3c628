"""How many dots of a bf16 ViT's compiled gradient run on bf16 operands (XLA:CPU upcasts the
others to f32), with mmjax.nn.precision off and on.

  python -m benchmarks.bf16_dots [VARIANT] [IMAGE_SIZE] [BATCH]     # default S/16 64 8

Compiles only (nothing runs), in one subprocess per setting of $MMJAX_BF16_DOTS; prints one
JSON line each: {"bf16_dots": "0"|"1", "dots": {"bf16": n, "f32": m}, ...}.
"""

import json
import os
import subprocess
import sys

CHILD = r"""
import json, re, sys
import jax, jax.numpy as jnp
from mmjax.models import vit
variant, size, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = vit.ViT(**vit.config(variant), dtype=jnp.bfloat16)
x = jnp.zeros((b, size, size, 3), jnp.float32)
params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1])["params"])
loss = lambda p: model.apply({"params": p}, x)[0].astype(jnp.float32).sum()
hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
shapes = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
counts = {}
for m in re.finditer(r"= \w+\[[\d,]*\]\S* dot\(%([^,\s)]+), %([^,\s)]+)\)", hlo):
  kind = shapes.get(m.group(1), "?")
  counts[kind] = counts.get(kind, 0) + 1
print(json.dumps(counts))
"""


def main() -> None:
  variant, size, batch = (sys.argv[1:4] + ["S/16", "64", "8"][len(sys.argv[1:4]):])
  for flag in ("0", "1"):
    out = subprocess.run([sys.executable, "-c", CHILD, variant, size, batch], check=True,
                         capture_output=True, text=True, env={**os.environ, "MMJAX_BF16_DOTS": flag})
    print(json.dumps({"bf16_dots": flag, "variant": variant, "image_size": int(size),
                      "batch": int(batch), "dots": json.loads(out.stdout.strip().splitlines()[-1])}))


if __name__ == "__main__":
  main()
