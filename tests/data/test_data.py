"""DataModules: fixed offline splits, shapes, and clear errors for impossible settings."""

from __future__ import annotations

import pytest
import torch

from lightning_parallel.data import DigitsDataModule, SyntheticDataModule, TextDataModule
from lightning_parallel.data.text import VOCAB_SIZE, decode


def test_digits_split_is_fixed_and_disjoint() -> None:
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup()
    b.setup()
    sizes = (len(a.train_set), len(a.val_set), len(a.test_set))  # type: ignore[arg-type]
    assert sum(sizes) == 1797
    torch.testing.assert_close(a.val_set.tensors[0], b.val_set.tensors[0])  # type: ignore[union-attr]
    train = {tuple(x.flatten().tolist()) for x, _ in a.train_set}  # type: ignore[union-attr]
    assert not any(tuple(x.flatten().tolist()) in train for x in a.test_set.tensors[0])  # type: ignore[union-attr]


def test_digits_upsampled_and_augmented() -> None:
    data = DigitsDataModule(batch_size=16, image_size=32, augment=True)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and y.dtype == torch.long


def test_text_corpus_round_trips_and_shifts_targets() -> None:
    data = TextDataModule(block_size=32, batch_size=8, max_chars=50_000)
    data.setup()
    idx, targets = data.splits["train"][0]
    assert idx.shape == (32,) and int(idx.max()) < VOCAB_SIZE
    torch.testing.assert_close(idx[1:], targets[:-1])
    text = decode(data.splits["train"].tensors[0][:50].flatten())
    assert text.isascii() and text.count(" the ") > 3


def test_synthetic_teacher_labels_are_learnable_by_a_linear_model() -> None:
    data = SyntheticDataModule(kind="vector", shape=[16], num_classes=4, num_samples=512)
    data.setup()
    x, y = data.train_set.tensors  # type: ignore[union-attr]
    # The labels are an argmax of a linear map, so least squares onto one-hot targets separates most of them.
    w = torch.linalg.lstsq(x, torch.nn.functional.one_hot(y, 4).float()).solution
    assert ((x @ w).argmax(1) == y).float().mean() > 0.7


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: DigitsDataModule(batch_size=0), "batch_size=0"),
        (lambda: DigitsDataModule(batch_size=5000), "batch_size=5000 exceeds"),
        (lambda: DigitsDataModule(val_fraction=0.6, test_fraction=0.4), "val_fraction \\+ test_fraction"),
        (lambda: DigitsDataModule(val_fraction=-0.1), "val_fraction=-0.1"),
        (lambda: DigitsDataModule(image_size=16), "image_size=16"),
        (lambda: TextDataModule(block_size=0), "block_size=0"),
        (lambda: TextDataModule(max_chars=100), "max_chars=100"),
        (lambda: SyntheticDataModule(kind="audio"), "kind='audio'"),
        (lambda: SyntheticDataModule(kind="image", shape=[8]), "shape=\\[C, H, W\\]"),
    ],
)
def test_impossible_settings_raise(factory: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()  # type: ignore[operator]
