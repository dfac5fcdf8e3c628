"""Pallas kernels and their custom_vjp wrappers (TPU via Mosaic, GPU via Triton).

On CPU the kernels run in interpret mode (`interpret=None` picks it there).
"""

from mmjax.pallas.flash_attention import flash_attention

__all__ = ["flash_attention"]
