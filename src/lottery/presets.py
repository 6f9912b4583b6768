"""Named reference recipes (docs/methods.md). Every field stays overridable from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lottery.errors import UnknownNameError
from lottery.hparams import DataHparams, ModelHparams, TrainingHparams


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    data: DataHparams
    model: ModelHparams
    training: TrainingHparams
    # Per-method hparams, e.g. {"cs": {"lam": 1e-8, "rounds": 3}}, keyed by the method's hparams prefix.
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-method changes to the model hparams: the CS reference code masks only ResNet-20's 3x3 convs,
    # while open_lth's IMP prunes every conv and the output layer.
    method_models: dict[str, dict[str, Any]] = field(default_factory=dict)

    def model_for(self, method: str, model: ModelHparams, given: set[str] = frozenset()) -> ModelHparams:
        """``model`` with this preset's changes for ``method``, except fields the user set (``given``)."""
        changes = {k: v for k, v in self.method_models.get(method, {}).items() if k not in given}
        return model.replace(**changes) if changes else model


#: The CS reference code's recipe for the mask (docs/methods.md): the logits on SGD with the weights' LR and
#: schedule, the temperature raised once per epoch to 200. lottery's default is the budget-robust recipe
#: (Adam logits, per-iteration temperature to 4000, docs/cs.md); the paper's presets keep the paper's.
_CS_REFERENCE = {"mask_optimizer": "sgd", "temperature_schedule": "epoch", "beta_final": 200.0}

_CIFAR_RECIPE = TrainingHparams(
    training_steps="160ep", batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
    schedule="multistep", milestones=("80ep", "120ep"), gamma=0.1,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "fashion_lenet",
            "LeNet-300-100 on Fashion-MNIST (open_lth LeNet recipe: SGD lr 0.1, batch 128), 40 epochs; CS: 3 rounds of "
            "20 epochs, rewind 1ep; the CPU default",
            DataHparams(dataset="fashion-mnist", val_size=5000),
            ModelHparams(model="lenet_300_100"),
            TrainingHparams(training_steps="40ep", batch_size=128, lr=0.1),
            methods={"cs": {"lam": 1e-8, "rounds": 3, "round_steps": "20ep", "rewind": "1ep"}},
        ),
        Preset(
            "fashion_conv4_narrow",
            "Conv-4 at width 0.125 (8, 8, 16, 16 channels) on Fashion-MNIST, 3 epochs, SGD lr 0.05, momentum 0.9, "
            "cosine; CS: 3 rounds of 2 epochs, rewind 100it: a convolutional "
            "network for CPU benchmarks",
            DataHparams(dataset="fashion-mnist", val_size=5000),
            ModelHparams(model="conv4", width=0.125),
            TrainingHparams(training_steps="3ep", batch_size=128, lr=0.05, momentum=0.9, schedule="cosine"),
            methods={"cs": {"lam": 1e-8, "rounds": 3, "round_steps": "2ep", "rewind": "100it"},
                     "imp": {"rewind": "100it"}},
        ),
        Preset(
            "fashion_resnet20",
            "ResNet-20 at width 0.25 (4, 8, 16 channels) on Fashion-MNIST, 16 epochs, SGD lr 0.1, momentum 0.9, "
            "wd 1e-4, cosine; CS: 2 rounds of 8 epochs, rewind 1ep; IMP: rewind 1ep: a residual network for CPU "
            "benchmarks (benchmarks/RESULTS.md, residual section; "
            "16 epochs measured 0.06 points from 32 on the mean of 3 seeds, 8 epochs 0.7 points short of 16)",
            DataHparams(dataset="fashion-mnist", val_size=5000),
            ModelHparams(model="resnet20", width=0.25),
            TrainingHparams(training_steps="16ep", batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                            schedule="cosine"),
            methods={"cs": {"lam": 1e-8, "rounds": 2, "round_steps": "8ep", "rewind": "1ep"},
                     "imp": {"rewind": "1ep"}},
        ),
        Preset(
            "cifar10_resnet20",
            "ResNet-20 on CIFAR-10 (open_lth: 160 epochs, lr 0.1, x0.1 at 80/120, wd 1e-4; "
            "CS reference: 3 rounds of 85 epochs, x0.1 at 56/71, rewind 2ep); GPU",
            DataHparams(dataset="cifar10", val_size=5000),
            ModelHparams(model="resnet20"),
            _CIFAR_RECIPE,
            methods={
                "cs": {"lam": 1e-8, "rounds": 3, "round_steps": "85ep", "round_milestones": ("56ep", "71ep"),
                       "rewind": "2ep", **_CS_REFERENCE},
                "imp": {"rewind": "500it"},  # the matching rewind point reported for ResNet-20 (docs/methods.md)
            },
            method_models={"cs": {"prune_ignore": ("*shortcut*", "fc.weight")}},
        ),
        Preset(
            "cifar10_vgg16",
            "VGG-16 (BN) on CIFAR-10, same recipe as ResNet-20 (CS: 3 rounds of 85 epochs); GPU",
            DataHparams(dataset="cifar10", val_size=5000),
            ModelHparams(model="vgg16"),
            _CIFAR_RECIPE,
            methods={
                "cs": {"lam": 1e-8, "rounds": 3, "round_steps": "85ep", "round_milestones": ("56ep", "71ep"),
                       "rewind": "2ep", **_CS_REFERENCE},
                "imp": {"rewind": "1000it"},  # reported matching rewind point for VGG-16
            },
        ),
        Preset(
            "imagenet_resnet50",
            "ResNet-50 on ImageNet (lr 0.4 at batch 1024, 90 epochs, x0.1 at 30/60/80, 5-epoch warm-up); multi-GPU",
            DataHparams(dataset="imagenet", val_size=0),
            ModelHparams(model="resnet50"),
            TrainingHparams(
                training_steps="90ep", batch_size=1024, lr=0.4, momentum=0.9, weight_decay=1e-4,
                schedule="multistep", milestones=("30ep", "60ep", "80ep"), warmup_steps="5ep",
            ),
            methods={"cs": {"rewind": "5ep", "rounds": 2, **_CS_REFERENCE}, "imp": {"rewind": "5ep"}},
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownNameError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
