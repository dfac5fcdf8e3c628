"""Flax Linen models: vit (image tower), text (text tower), two_tower (CLIP/SigLIP)."""
