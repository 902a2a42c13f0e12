"""``DigitsDataModule``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes), fixed splits."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

import pytorch_lightning as pl
from lightning_asyncpred.data.resumable import resumable_train_loader
from lightning_asyncpred.validation import check_int


class DigitsDataModule(pl.LightningDataModule):
    """The digits data set as ``(N, 1, 8, 8)`` float tensors in ``[0, 1]``.

    The test split (``test_fraction`` of the data) is fixed: it depends on nothing but the data. The
    validation split (``val_fraction`` of the rest) is carved from the training data with ``split_seed``,
    so hyperparameters can be chosen without ever looking at the test split.

    The training loader is resumable mid-epoch (see :mod:`lightning_asyncpred.data.resumable`): epoch ``e``
    is shuffled with ``shuffle_seed + e`` (default: the ``seed_everything`` seed), on one device as under a
    distributed strategy.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        shuffle_seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self.train_set: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        n_test = int(round(self.test_fraction * len(y)))
        test_idx, rest = perm[:n_test], perm[n_test:]
        rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(self.split_seed))]
        n_val = int(round(self.val_fraction * len(rest)))
        val_idx, train_idx = rest[:n_val], rest[n_val:]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])

    def train_dataloader(self) -> DataLoader:
        return resumable_train_loader(
            self.train_set, self.batch_size, self.shuffle_seed, drop_last=True, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, num_workers=self.num_workers)
