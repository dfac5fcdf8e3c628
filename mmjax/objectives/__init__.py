"""What a run optimises, one module per objective, found by name from config.loss.

  contrastive  CLIP / SigLIP two towers (LiT, FLIP; any loss of mmjax.losses.registry)
  mae          masked autoencoder         moco    MoCo v3 (two views, momentum encoder)
  catlip       caption-label classifier   coca    contrastive + captioning (+ ITM)
  siglip2      SigLIP 2's recipe          bind    ImageBind-style: audio bound to the images

A new objective is a class deriving `Objective`, decorated `@register('name')`, defined
anywhere (a config file may define it): `config.loss='name'` then trains it.
"""

from mmjax.objectives.base import (Context, Objective, get, make, names, register,
                                   train_apply)
from mmjax.objectives import (bind, catlip, coca, contrastive, mae, moco,  # noqa: F401  (registers)
                              siglip2)

__all__ = ["Context", "Objective", "get", "make", "names", "register", "train_apply"]
