"""Architecture registry and checkpoints.

    model = create_model("resnet18", num_classes=10, in_chans=3, img_size=32, stem="cifar")
    save_model(model, "out/", dataset="cifar10", metrics={...})
    model = load("out/")            # or runs:/<id>/model, models:/teacher.digits.convnet/3
"""

from metaensemble.models import resnet, small, timm_models, vgg  # noqa: F401  (registers)
from metaensemble.models.checkpoint import (
    check_state_dict,
    load,
    local_dir,
    read_meta,
    read_weights,
    save_model,
    save_weights,
    state_dict_tensors,
    unwrap,
)
from metaensemble.models.registry import MODELS, create_model, model_kwargs, register_model


def check_name(name: str) -> None:
    MODELS.check(name)


def names() -> list[str]:
    return MODELS.names()


__all__ = [
    "MODELS", "check_name", "check_state_dict", "create_model", "load", "local_dir", "model_kwargs",
    "names", "read_meta", "read_weights", "register_model", "save_model", "save_weights", "state_dict_tensors", "unwrap",
]
