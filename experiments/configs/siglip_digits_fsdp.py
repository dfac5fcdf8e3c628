"""The default SigLIP digits job on 8 devices: 2-way data x 4-way FSDP, the ring loss.

On a CPU, simulate the devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.train \
      --config experiments/configs/siglip_digits_fsdp.py --workdir workdirs/siglip_fsdp
"""

from experiments.configs import siglip_digits


def get_config():
  c = siglip_digits.get_config()
  c.num_devices = 8
  c.mesh.data = 2
  c.mesh.fsdp = 4
  c.loss_impl = "ring"
  c.sharding.fsdp_min_size = 2 ** 12
  return c
