"""Model families, registered by name on import (``build_model("resnet20")``).

Families: ``lenet_300_100``; ``conv2``/``conv4``/``conv6`` (Frankle & Carbin 2019); CIFAR
``vgg11``/``vgg16``/``vgg19`` with BatchNorm; CIFAR ``resnet20``/``resnet32``/``resnet56`` (option
``width``); ImageNet ``resnet18``/``resnet50`` (torchvision parameter names). Every builder takes
``input_shape`` and ``num_classes`` so a model adapts to the data set it is trained on.
"""

from lottery.models.registry import (
    ModelSpec,
    build_model,
    get_model_spec,
    model_names,
    register_model,
)

# Imported for their side effect: each module registers its models.
from lottery.models import convnets, lenet, resnet_cifar, resnet_imagenet, vgg  # noqa: E402,F401  isort:skip

__all__ = ["ModelSpec", "build_model", "get_model_spec", "model_names", "register_model"]
