"""One data set, one name: the spellings a user types are stored as the registered name, so the same
data never gets a second set of run folders."""

from __future__ import annotations

import pytest

from lottery.data.datasets import DATASETS, canonical_name
from lottery.dataset_names import BUILT_IN_DATASETS, canonical_dataset_name
from lottery.experiment import run_folder_name
from lottery.hparams import DataHparams, ModelHparams


def test_the_foundation_list_is_the_registry():
    assert sorted(BUILT_IN_DATASETS) == sorted(DATASETS)


@pytest.mark.parametrize("typed", ["fashion_mnist", "FashionMNIST", "Fashion-MNIST", "fashion mnist"])
def test_spellings_are_stored_and_hashed_as_the_registered_name(typed):
    assert DataHparams(dataset=typed).dataset == "fashion-mnist"
    assert DataHparams(dataset=typed).to_dict() == DataHparams().to_dict()
    m = ModelHparams()
    assert run_folder_name("train", DataHparams(dataset=typed), m) == run_folder_name("train", DataHparams(), m)


def test_unknown_names_are_kept_for_the_registry_to_refuse():
    assert canonical_dataset_name("imagenette") == "imagenette"
    assert canonical_name("CIFAR-10") == "cifar10"
