"""Contrastive losses as pure functions: `f(img_emb, txt_emb, scale[, bias]) -> scalar`.

`impl` (how the batch is distributed) and `blocks` (how each block of logits
is computed) are two arguments of clip_loss / siglip_loss; IMPLS and BLOCKS
name their values (config validation reuses them). multilabel_bce_loss(logits, targets)
is CatLIP's (an image classifier over caption labels).
"""

from mmjax.losses.blocks import BLOCKS, Blocks
from mmjax.losses.contrastive import IMPLS, clip_loss, infonce_loss, siglip_loss
from mmjax.losses.multilabel import multilabel_bce_loss

__all__ = ["BLOCKS", "Blocks", "IMPLS", "clip_loss", "infonce_loss", "siglip_loss",
           "multilabel_bce_loss"]
