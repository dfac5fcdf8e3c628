"""Pallas kernels and their custom_vjp wrappers (TPU via Mosaic, GPU via Triton).

On CPU the kernels run in interpret mode (`interpret=None` picks it there). With
the default platform=None the kernel layout is chosen per lowering platform
(mmjax/pallas/per_platform.py), so one jitted function exports for TPU and CUDA.
"""

from mmjax.pallas.flash_attention import flash_attention

__all__ = ["flash_attention"]
