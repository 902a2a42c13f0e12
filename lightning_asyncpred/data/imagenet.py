"""``ImageNetDataModule``: ImageNet-layout folders through NVIDIA DALI (GPU or CPU-only) or torchvision."""

from __future__ import annotations

import sys
from typing import Any, Optional

from torch.utils.data import DataLoader

import pytorch_lightning as pl
from lightning_asyncpred.data import dali as dali_backend
from lightning_asyncpred.data.folder import (
    VERIFY_MODES,
    ImageFolderLayout,
    ScannedImageFolder,
    scan_layout,
    train_transform,
    val_transform,
    verify_images,
)
from lightning_asyncpred.data.resumable import resumable_train_loader
from lightning_asyncpred.validation import check_int

BACKENDS = ("dali", "torchvision")
DALI_DEVICES = ("auto", "gpu", "cpu")
NVJPEG_PADDING_MODES = ("train", "all", "none")


def pad_to_multiple(items: list, num_shards: int) -> list:
    """``items`` plus its first ``(-len) % num_shards`` items again, as ``DistributedSampler`` pads.

    DALI's reader splits ``N`` samples into shards of ``floor``/``ceil`` sizes; with equal shard sizes every
    rank gets the same number of batches and no rank ever gets an empty last batch. At most
    ``num_shards - 1`` samples are seen twice per epoch (none on one rank).
    """
    pad = (-len(items)) % num_shards
    return list(items) + list(items[:pad])


class ImageNetDataModule(pl.LightningDataModule):
    """ImageNet (or any folder in its layout): ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    Labels are the class folders' indices in sorted order (as ``torchvision.datasets.ImageFolder``). The val
    split serves ``validate``, ``test`` and ``predict``.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        backend: ``"dali"`` (needs ``pip install -e .[dali]``) or ``"torchvision"`` (``DataLoader`` with
            ``num_threads`` worker processes; Lightning adds the ``DistributedSampler`` in distributed runs).
        dali_device: ``"gpu"`` (``mixed`` nvJPEG decoding on the rank's local GPU), ``"cpu"`` (CPU-only
            pipeline, ``device_id=None``) or ``"auto"`` (GPU when the trainer runs on CUDA, else CPU).
        batch_size: per-device (per-rank) batch size; ``val_batch_size`` defaults to it.
        num_threads: DALI CPU threads, or DataLoader workers for torchvision.
        image_size: training crop and val center-crop side (224).
        val_resize: the val shorter side before the center crop (256).
        verify_images: up-front check of the files with PIL, so that an unreadable file is named before
            training starts: ``"header"`` (default; ``Image.verify()``), ``"full"`` (decode everything) or
            ``"none"``. Each rank checks ``1/world_size`` of the files. Decode errors during training are
            also reported with the file's name (see ``data/folder.py`` and ``data/dali.py``).
        seed: the shuffling seed; must be the same on every rank (the shards partition one permutation). DALI
            and the torchvision backend on one device use it; under a distributed strategy Lightning's
            ``DistributedSampler`` shuffles the torchvision loader with the ``seed_everything`` seed.
        nvjpeg_padding: DALI ``mixed`` decoding: which pipelines preallocate nvJPEG buffers for large images
            (``dali.NVJPEG_PADDING``; per rank and decoding thread about 201 MiB of GPU memory and 268 MiB of
            pinned host memory): ``"train"`` (default), ``"all"`` or ``"none"`` (DALI's small defaults;
            buffers then grow on demand).
        pin_memory: torchvision backend only.
        worker_start_method: torchvision backend only: how DataLoader workers start (``"auto"``: the
            platform default, but ``"forkserver"`` when DALI is loaded in the same process).
    """

    def __init__(
        self,
        root: str,
        backend: str = "dali",
        dali_device: str = "auto",
        batch_size: int = 256,
        val_batch_size: Optional[int] = None,
        num_threads: int = 4,
        image_size: int = 224,
        val_resize: int = 256,
        verify_images: str = "header",
        seed: int = 0,
        nvjpeg_padding: str = "train",
        pin_memory: bool = True,
        worker_start_method: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if dali_device not in DALI_DEVICES:
            raise ValueError(f"dali_device must be one of {', '.join(DALI_DEVICES)}, got {dali_device!r}")
        if verify_images not in VERIFY_MODES:
            raise ValueError(f"verify_images must be one of {', '.join(VERIFY_MODES)}, got {verify_images!r}")
        for name, value in (("batch_size", batch_size), ("num_threads", num_threads), ("image_size", image_size), ("val_resize", val_resize)):
            check_int(name, value, 1)
        if val_batch_size is not None:
            check_int("val_batch_size", val_batch_size, 1)
        if val_resize < image_size:
            raise ValueError(f"val_resize ({val_resize}) must be >= image_size ({image_size}) for the center crop")
        if nvjpeg_padding not in NVJPEG_PADDING_MODES:
            raise ValueError(f"nvjpeg_padding must be one of {', '.join(NVJPEG_PADDING_MODES)}, got {nvjpeg_padding!r}")
        if worker_start_method not in ("auto", "fork", "forkserver", "spawn"):
            raise ValueError(f"worker_start_method must be auto, fork, forkserver or spawn, got {worker_start_method!r}")
        if backend == "dali":
            dali_backend.require_dali()
        self.save_hyperparameters()
        self.root = root
        self.backend = backend
        self.dali_device = dali_device
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_threads = num_threads
        self.image_size = image_size
        self.val_resize = val_resize
        self.verify_images = verify_images
        self.seed = seed
        self.nvjpeg_padding = nvjpeg_padding
        self.pin_memory = pin_memory
        self.worker_start_method = worker_start_method
        self.layout: Optional[ImageFolderLayout] = None
        self._loaders: dict[str, Any] = {}

    # ------------------------------------------------------------------ topology
    def _topology(self) -> tuple[int, int, int]:
        """``(global_rank, world_size, local_rank)`` from the attached trainer, else ``(0, 1, 0)``."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        return trainer.global_rank, trainer.world_size, trainer.local_rank

    def resolved_dali_device(self) -> str:
        """``"gpu"`` or ``"cpu"``: what ``dali_device`` means for the attached trainer and this machine."""
        import torch

        if self.dali_device == "cpu":
            return "cpu"
        if self.dali_device == "gpu":
            if not torch.cuda.is_available():
                raise RuntimeError("dali_device='gpu' but no CUDA GPU is available; use dali_device='cpu' or 'auto'")
            return "gpu"
        trainer = self.trainer
        on_cuda = torch.cuda.is_available()
        if trainer is not None:
            from pytorch_lightning.accelerators import CUDAAccelerator

            on_cuda = on_cuda and isinstance(trainer.accelerator, CUDAAccelerator)
        return "gpu" if on_cuda else "cpu"

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes found (``None`` before ``setup``)."""
        return None if self.layout is None else self.layout.num_classes

    # ------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        if self.layout is None:
            self.layout = scan_layout(self.root)
            rank, world, _ = self._topology()
            files = self.layout.train.files + self.layout.val.files
            verify_images(files[rank::world], self.verify_images, self.num_threads)
        self._check_model_classes()
        wanted = ["train", "val"] if stage in (None, "fit") else ["val"]
        for split in wanted:
            if split not in self._loaders:
                self._loaders[split] = self.build_loader(split)

    def _check_model_classes(self) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        model_classes = getattr(getattr(module, "hparams", None), "num_classes", None)
        found = self.layout.num_classes
        if isinstance(model_classes, int) and model_classes < found:
            raise ValueError(
                f"the data under {self.root!r} has {found} classes but the model has num_classes={model_classes}; "
                f"set --model.num_classes {found}"
            )

    def build_loader(self, split: str, shard_id: Optional[int] = None, num_shards: Optional[int] = None) -> Any:
        """The loader of ``split`` (``"train"``/``"val"``) for shard ``shard_id`` of ``num_shards``.

        Defaults: the trainer's global rank and world size (DALI shards itself; for torchvision Lightning adds
        the ``DistributedSampler``, so the returned DataLoader covers the whole split).
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if self.layout is None:
            self.layout = scan_layout(self.root)
        rank, world, local_rank = self._topology()
        shard_id = rank if shard_id is None else shard_id
        num_shards = world if num_shards is None else num_shards
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
        data = self.layout.train if split == "train" else self.layout.val
        train = split == "train"
        batch = self.batch_size if train else self.val_batch_size
        if self.backend == "torchvision":
            transform = train_transform(self.image_size) if train else val_transform(self.image_size, self.val_resize)
            dataset = ScannedImageFolder(data, self.layout.classes, transform=transform)
            loader_kwargs = dict(
                num_workers=self.num_threads,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_threads > 0,
                drop_last=False,
                multiprocessing_context=self._worker_start_method(),
            )
            if train:  # resumable mid-epoch (torchdata's StatefulDataLoader, order a function of seed and epoch)
                return resumable_train_loader(dataset, batch, self.seed, **loader_kwargs)
            return DataLoader(dataset, batch_size=batch, shuffle=False, **loader_kwargs)
        device = self.resolved_dali_device()
        device_id = local_rank
        root = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        if device == "gpu" and root is not None and root.type == "cuda" and root.index is not None:
            device_id = root.index  # the GPU this rank trains on (equals local_rank unless devices are remapped)
        files, labels = pad_to_multiple(data.files, num_shards), pad_to_multiple(data.labels, num_shards)

        def build(generation: int, checkpoint: Optional[str] = None, source: Optional[Any] = None) -> Any:
            return dali_backend.build_pipeline(
                files,
                labels,
                train=train,
                batch_size=batch,
                num_threads=self.num_threads,
                device=device,
                device_id=device_id if device == "gpu" else None,
                shard_id=shard_id,
                num_shards=num_shards,
                image_size=self.image_size,
                val_resize=self.val_resize,
                seed=self.seed + 1000 * generation,
                checkpointing=train,
                checkpoint=checkpoint,
                nvjpeg_padding=self.nvjpeg_padding == "all" or (train and self.nvjpeg_padding == "train"),
                source=source,
            )

        # training: resumable mid-epoch through DALI's own checkpointing
        loader_cls = dali_backend.ResumableDALILoader if train else dali_backend.DALILoader
        # (the shared batch pool of the p2p strategy draws from the unpadded list: loader.with_pool)
        return loader_cls(build, data.files, batch_size=batch, num_threads=self.num_threads, labels=data.labels,
                         seed=self.seed)

    def _worker_start_method(self) -> Optional[str]:
        """The DataLoader workers' start method: ``worker_start_method``; ``"auto"`` is the platform default,
        except ``"forkserver"`` once DALI is loaded in this process (forking while DALI's threads decode can
        leave a worker deadlocked)."""
        if self.worker_start_method != "auto":
            return self.worker_start_method
        return "forkserver" if "nvidia.dali.backend_impl" in sys.modules else None

    def train_dataloader(self) -> Any:
        if "train" not in self._loaders:
            self.setup("fit")
        return self._loaders["train"]

    def val_dataloader(self) -> Any:
        if "val" not in self._loaders:
            self.setup("validate")
        return self._loaders["val"]

    def test_dataloader(self) -> Any:
        return self.val_dataloader()

    def predict_dataloader(self) -> Any:
        return self.val_dataloader()

    def teardown(self, stage: Optional[str] = None) -> None:
        for loader in self._loaders.values():
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        self._loaders.clear()
