"""ImageNet-style folder layout (``root/train/<class>/*.JPEG``, ``root/val/<class>/*.JPEG``): scan, check, and
the torchvision backend (dataset + transforms).

The scan reuses :func:`torchvision.datasets.folder.make_dataset` (the same class order and file order as
``ImageFolder``: classes sorted by name, label = index in that order), so the DALI and torchvision backends
give every file the same label.

Corrupt images. Two checks name the bad file:

* up front (``verify_images``): ``"header"`` opens every file with PIL and calls ``Image.verify()`` (reads the
  header and markers, not the pixel data: catches files that are not images at all, ~0.1 ms a file);
  ``"full"`` decodes every file (also catches truncated JPEGs; slow on ImageNet); ``"none"`` skips it. In a
  distributed run each rank checks only ``files[rank::world_size]``.
* at load time: a decode error is re-raised as :class:`CorruptImageError` with the file's path (torchvision
  loader; the DALI loader maps pipeline errors, see ``data/dali.py``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torchvision.datasets import DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VERIFY_MODES = ("none", "header", "full")


class CorruptImageError(RuntimeError):
    """An image file that cannot be read or decoded; the message names the file."""


@dataclass(frozen=True)
class Split:
    """One split of the folder: ``samples`` are ``(path, label)`` pairs in ``ImageFolder`` order."""

    root: str
    samples: list[tuple[str, int]]

    @property
    def files(self) -> list[str]:
        return [path for path, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class ImageFolderLayout:
    """The scanned ``root``: sorted class names and the train and val splits."""

    root: str
    classes: list[str]
    train: Split
    val: Split

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _class_dirs(split_dir: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def scan_layout(root: str, extensions: Sequence[str] = IMG_EXTENSIONS) -> ImageFolderLayout:
    """Scan ``root`` and check the layout; raises ``FileNotFoundError``/``ValueError`` with what is wrong."""
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"data root {root!r} does not exist or is not a directory; point --data.root at a folder holding "
            f"train/<class>/*.JPEG and val/<class>/*.JPEG (the standard ImageNet layout)"
        )
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"missing {split}/ folder under data root {root!r}: expected {split_dir}/<class>/*.JPEG")
        classes[split] = _class_dirs(split_dir)
        if not classes[split]:
            loose = [f for f in os.listdir(split_dir) if f.lower().endswith(tuple(extensions))]
            hint = (
                f" ({len(loose)} images lie directly in it: sort them into one sub-folder per class, e.g. with "
                f"the usual ImageNet valprep.sh)"
                if loose
                else ""
            )
            raise ValueError(f"{split_dir} has no class sub-folders{hint}")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ValueError(
            f"train/ and val/ under {root!r} have different class folders: "
            f"only in train/: {_preview(only_train)}; only in val/: {_preview(only_val)}"
        )
    class_to_idx = {name: i for i, name in enumerate(classes["train"])}
    splits = {}
    for split in ("train", "val"):
        split_dir = os.path.join(root, split)
        samples = make_dataset(split_dir, class_to_idx, extensions=tuple(extensions), allow_empty=True)
        counts = [0] * len(class_to_idx)
        for _, label in samples:
            counts[label] += 1
        empty = [name for name, i in class_to_idx.items() if counts[i] == 0]
        if empty:
            raise ValueError(
                f"{len(empty)} class folder(s) in {split_dir} hold no image ({', '.join(extensions)}): {_preview(empty)}"
            )
        splits[split] = Split(split_dir, samples)
    return ImageFolderLayout(root, classes["train"], splits["train"], splits["val"])


def _preview(names: Sequence[str], limit: int = 10) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_one(path: str, mode: str) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if mode == "full":
                img.load()
            else:
                img.verify()
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"{path}: {type(exc).__name__}: {exc}"
    return None


def verify_images(files: Sequence[str], mode: str = "header", num_threads: int = 4) -> None:
    """Open every file with PIL (``header``: ``verify()``; ``full``: decode); raise naming every bad file."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify_images must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    if mode == "none" or not files:
        return
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        problems = [p for p in pool.map(lambda f: _check_one(f, mode), files, chunksize=64) if p is not None]
    if problems:
        raise CorruptImageError(
            f"{len(problems)} unreadable image file(s) (remove or replace them):\n  " + "\n  ".join(problems[:20])
            + (f"\n  ... ({len(problems)} in all)" if len(problems) > 20 else "")
        )


def find_undecodable(files: Sequence[str], num_threads: int = 4) -> list[str]:
    """Fully decode ``files`` with PIL and return the problems found (``path: error``)."""
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return [p for p in pool.map(lambda f: _check_one(f, "full"), files, chunksize=64) if p is not None]


# ---------------------------------------------------------------------------------------- torchvision backend
def pil_rgb_loader(path: str) -> Any:
    """``ImageFolder``'s PIL loader, with decode errors re-raised as :class:`CorruptImageError` naming ``path``."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")
    except Exception as exc:
        raise CorruptImageError(f"cannot decode image file {path}: {type(exc).__name__}: {exc}") from exc


class ScannedImageFolder(DatasetFolder):
    """``torchvision.datasets.DatasetFolder`` over an already scanned :class:`Split` (no second directory walk)."""

    def __init__(self, split: Split, classes: Sequence[str], transform: Optional[Callable] = None) -> None:
        self._split = split
        self._classes = list(classes)
        super().__init__(split.root, loader=pil_rgb_loader, extensions=None, transform=transform, is_valid_file=lambda _: True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._classes, {name: i for i, name in enumerate(self._classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: Any = None, is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        return list(self._split.samples)


def train_transform(image_size: int) -> Callable:
    """Random-resized crop (area 0.08-1, aspect 3/4-4/3) to ``image_size``, flip 0.5, normalize (CHW float)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def val_transform(image_size: int, val_resize: int) -> Callable:
    """Resize the shorter side to ``val_resize``, center crop ``image_size``, normalize (CHW float)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize(val_resize, antialias=True),
            v2.CenterCrop(image_size),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
