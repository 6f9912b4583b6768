"""The names of lottery's own data sets and the spellings that mean them (``FashionMNIST``,
``fashion_mnist`` and ``Fashion-MNIST`` are all ``fashion-mnist``).

A foundation module, below both the hparams (which store the canonical name, so that one data set
never gets two sets of run folders) and the data registry (``lottery.data.datasets``, which holds
the specs under these names; a test keeps the two lists equal).
"""

from __future__ import annotations

import re

BUILT_IN_DATASETS = ("cifar10", "cifar100", "fashion-mnist", "imagenet", "mnist", "synthetic")


def dataset_key(name: str) -> str:
    """What two spellings of one name share: lower case, without '-', '_' and spaces."""
    return re.sub(r"[-_ ]", "", name.strip().lower())


def canonical_dataset_name(name: str) -> str:
    """The registered spelling of a built-in data set's name; any other name is returned as given (it
    is checked against the registry, with the list of known names, when data is loaded)."""
    if name in BUILT_IN_DATASETS:
        return name
    wanted = dataset_key(name)
    for known in BUILT_IN_DATASETS:
        if dataset_key(known) == wanted:
            return known
    return name
