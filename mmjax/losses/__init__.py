"""Contrastive losses as pure functions: `f(img_emb, txt_emb, scale[, bias]) -> scalar`.

`impl` (how the batch is distributed) and `blocks` (how each block of logits
is computed) are two arguments of clip_loss / siglip_loss; IMPLS and BLOCKS
name their values (config validation reuses them). multilabel_bce_loss(logits, targets)
is CatLIP's (an image classifier over caption labels). `contrastive(name, impl, blocks, mesh=,
axes=)` picks a registered loss by name (config.loss), wrapped in shard_map when sharded.
"""

from mmjax.losses.blocks import BLOCKS, Blocks
from mmjax.losses.contrastive import IMPLS, clip_loss, infonce_loss, siglip_loss
from mmjax.losses.multilabel import multilabel_bce_loss
from mmjax.losses.registry import CONTRASTIVE, contrastive, register_contrastive

__all__ = ["BLOCKS", "Blocks", "IMPLS", "clip_loss", "infonce_loss", "siglip_loss",
           "multilabel_bce_loss", "CONTRASTIVE", "contrastive", "register_contrastive"]
