"""timm-backed vision transformers (DeiT, LeViT), always built with pretrained=False:
nothing is downloaded at run time."""

from __future__ import annotations

import torch.nn as nn

from metaensemble.models.registry import register_model

_DEIT = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}


def default_patch(img_size: int) -> int:
    # 16 px patches at ImageNet scale; small images keep a 4x4..8x8 token grid.
    return 16 if img_size >= 64 else max(1, img_size // 8) if img_size >= 16 else max(1, img_size // 4)


def _deit(timm_name: str):
    def build(num_classes: int, in_chans: int, img_size: int, patch_size: int | None = None,
              depth: int | None = None, drop_path_rate: float = 0.0) -> nn.Module:
        import timm

        kw = {"depth": depth} if depth is not None else {}
        return timm.create_model(
            timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
            img_size=img_size, patch_size=patch_size or default_patch(img_size),
            drop_path_rate=drop_path_rate, **kw,
        )

    return build


for _short, _timm_name in _DEIT.items():
    register_model(_short)(_deit(_timm_name))


@register_model("levit_384")
def levit_384(num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    import timm

    if img_size % 16:
        from metaensemble.errors import ConfigError

        raise ConfigError(f"levit_384 needs an image size divisible by 16, got {img_size}")
    return timm.create_model("levit_384", pretrained=False, num_classes=num_classes,
                             in_chans=in_chans, img_size=img_size)
