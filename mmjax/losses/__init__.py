"""Contrastive losses as pure functions: `f(img_emb, txt_emb, scale[, bias]) -> scalar`."""

from mmjax.losses.contrastive import clip_loss, infonce_loss, siglip_loss

__all__ = ["clip_loss", "infonce_loss", "siglip_loss"]
