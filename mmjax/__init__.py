"""mmjax: image-text representation learning in JAX (CLIP, SigLIP and friends).

Importing it changes nothing outside mmjax: process-wide settings (mmjax.hostmem's malloc
tuning) belong to the launcher, which applies them before JAX starts.
"""

__version__ = "0.1.0"
