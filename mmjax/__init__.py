"""mmjax: image-text representation learning in JAX (CLIP, SigLIP and friends)."""

__version__ = "0.1.0"
