"""mmjax: image-text representation learning in JAX (CLIP, SigLIP and friends)."""

from mmjax import hostmem as _hostmem

__version__ = "0.1.0"

_hostmem.keep_freed_memory()   # before JAX's CPU client starts: see mmjax/hostmem.py
