"""ImageNetDataModule: the DALI CPU-only pipeline for real, the torchvision backend, and the layout errors."""

from __future__ import annotations

import math
import os
import shutil
import sys

import pytest
import torch

from lightning_asyncpred.data import CorruptImageError, ImageNetDataModule
from lightning_asyncpred.data import dali as dali_backend
from lightning_asyncpred.data.folder import IMAGENET_MEAN, IMAGENET_STD, scan_layout
from tests.imagenet_fixtures import class_name, dominant_channel, make_imagenet_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
needs_dali = pytest.mark.skipif(not dali_backend.dali_available(), reason="needs the [dali] extra")

NUM_CLASSES, N_TRAIN, N_VAL = 3, 6, 2  # 18 train and 6 val images
SIZE, RESIZE, BATCH = 32, 36, 4
# normalized values lie in [(0 - mean) / std, (1 - mean) / std] per channel
LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
# Deterministic val path, DALI vs torchvision on the same JPEGs: mean absolute difference of the normalized
# tensors. The two JPEG decoders and the two antialiased bilinear resizers differ slightly: measured 0.0064
# here (0.0052 at 224/256; max single value 0.09). Tolerance 0.02 in normalized units (std ~0.225), i.e.
# about 1.2 grey levels of 255 on average.
VAL_AGREEMENT_TOL = 0.02


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_imagenet_folder(tmp_path_factory.mktemp("imagenet"), NUM_CLASSES, N_TRAIN, N_VAL)


def datamodule(root, backend="dali", **kw):
    args = dict(backend=backend, dali_device="cpu", batch_size=BATCH, num_threads=1, image_size=SIZE, val_resize=RESIZE, pin_memory=False)
    args.update(kw)
    return ImageNetDataModule(str(root), **args)


def epoch(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


# ------------------------------------------------------------------------------------------------ DALI
@needs_dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_cpu_batches(folder, split):
    dm = datamodule(folder)
    dm.setup("fit")
    assert dm.num_classes == NUM_CLASSES
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    n = NUM_CLASSES * (N_TRAIN if split == "train" else N_VAL)
    assert len(loader) == math.ceil(n / BATCH)
    for _ in range(2):  # a second epoch: the iterator resets
        xs, ys = epoch(loader)
        assert len(xs) == len(loader)
        for x, y in zip(xs, ys):
            assert x.shape == (len(y), 3, SIZE, SIZE) and x.dtype == torch.float32
            assert y.dtype == torch.long and y.dim() == 1
            assert x.min() >= LOW - 1e-4 and x.max() <= HIGH + 1e-4
            assert x.mean().abs() < 2.0
        x, y = torch.cat(xs), torch.cat(ys)
        assert len(y) == n  # the last batch is partial; nothing is padded or dropped on one shard
        assert sorted(y.tolist()) == sorted(label for _, label in getattr(scan_layout(folder), split).samples)
        # labels agree with the folder: class k's pictures are bright in channel k % 3
        assert torch.equal(dominant_channel(x), y % 3)


@needs_dali
def test_dali_val_is_deterministic(folder):
    dm = datamodule(folder)
    dm.setup("validate")
    a = torch.cat(epoch(dm.val_dataloader())[0])
    b = torch.cat(epoch(dm.val_dataloader())[0])
    assert torch.equal(a, b)


@needs_dali
def test_dali_train_reshuffles_every_epoch(folder):
    dm = datamodule(folder, seed=3)
    dm.setup("fit")
    first = torch.cat(epoch(dm.train_dataloader())[1])
    second = torch.cat(epoch(dm.train_dataloader())[1])
    assert sorted(first.tolist()) == sorted(second.tolist())
    assert first.tolist() != second.tolist()  # reshuffled every epoch


@needs_dali
def test_dali_seed_changes_the_order_of_every_epoch(folder):
    """DALI's shuffle_after_epoch ignores the reader's seed; the file list is permuted with the seed first."""

    def two_epochs(seed):
        dm = datamodule(folder, seed=seed)
        dm.setup("fit")
        return [torch.cat(epoch(dm.train_dataloader())[1]).tolist() for _ in range(2)]

    a, b, c = two_epochs(3), two_epochs(3), two_epochs(4)
    assert a == b  # reproducible
    assert a[0] != c[0] and a[1] != c[1]  # another seed, another order in every epoch
    assert sorted(a[0]) == sorted(c[0])


@pytest.mark.parametrize("mode, train, val", [("train", True, False), ("all", True, True), ("none", False, False)])
def test_nvjpeg_padding_applies_to_the_chosen_pipelines(folder, monkeypatch, mode, train, val):
    seen = {}
    monkeypatch.setattr(dali_backend, "require_dali", lambda: None)
    monkeypatch.setattr(dali_backend, "build_pipeline", lambda *a, **kw: seen.update({kw["train"]: kw["nvjpeg_padding"]}))
    for cls in ("DALILoader", "ResumableDALILoader"):
        monkeypatch.setattr(dali_backend, cls, lambda build, *a, **kw: build(0))
    dm = datamodule(folder, nvjpeg_padding=mode, verify_images="none")
    dm.build_loader("train")
    dm.build_loader("val")
    assert seen == {True: train, False: val}


def test_bad_nvjpeg_padding():
    with pytest.raises(ValueError, match="nvjpeg_padding must be one of train, all, none, got 'some'"):
        ImageNetDataModule("/nowhere", backend="torchvision", nvjpeg_padding="some")


@needs_dali
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("n_files", [18, 17, 13])
def test_dali_two_shards_cover_the_data(folder, split, n_files):
    """Sample indices as labels: 2 shards give the same number of batches, no empty batch, and cover all."""
    from lightning_asyncpred.data.imagenet import pad_to_multiple

    files = sorted(f for f, _ in scan_layout(folder).train.samples)[:n_files]
    padded, indices = pad_to_multiple(files, 2), pad_to_multiple(list(range(n_files)), 2)
    loaders = [
        dali_backend.DALILoader(
            lambda gen, shard=shard: dali_backend.build_pipeline(
                padded, indices, train=split == "train", batch_size=BATCH, num_threads=1, device="cpu", device_id=None,
                shard_id=shard, num_shards=2, image_size=SIZE, val_resize=RESIZE, seed=gen,
            ),
            files,
            BATCH,
        )
        for shard in range(2)
    ]
    assert len(loaders[0]) == len(loaders[1]) == math.ceil(math.ceil(n_files / 2) / BATCH)
    for _ in range(2):
        per_shard = []
        for loader in loaders:
            ys = epoch(loader)[1]
            assert len(ys) == len(loader) and all(len(y) > 0 for y in ys)
            per_shard.append(torch.cat(ys).tolist())
        assert len(per_shard[0]) == len(per_shard[1]) == math.ceil(n_files / 2)
        assert set(per_shard[0]) | set(per_shard[1]) == set(range(n_files))
        assert len(per_shard[0]) + len(per_shard[1]) - n_files == n_files % 2  # at most 1 duplicate


@needs_dali
def test_dali_train_loader_resumes_mid_epoch_on_every_shard_from_rank_0s_state(folder):
    """Lightning saves rank 0's loader state and every rank loads it: each shard must continue exactly."""
    dms = [datamodule(folder, seed=5) for _ in range(2)]
    loaders = [dm.build_loader("train", shard_id=k, num_shards=2) for k, dm in enumerate(dms)]
    assert all(isinstance(loader, dali_backend.ResumableDALILoader) for loader in loaders)

    def batches(loader, n=None):
        out = []
        for images, labels in loader:
            out.append((images.sum().item(), labels.tolist()))
            if n is not None and len(out) == n:
                break
        return out

    n = len(loaders[0])
    assert n >= 3
    streams, state = [], None
    for k, loader in enumerate(loaders):
        stream = batches(loader)  # epoch 0
        it = iter(loader)  # epoch 1: stop after 2 batches, as a checkpoint between batches sees it
        stream += [(x.sum().item(), y.tolist()) for x, y in (next(it), next(it))]
        if k == 0:
            state = loader.state_dict()
        stream += [(x.sum().item(), y.tolist()) for x, y in it] + batches(loader)  # rest of epoch 1, epoch 2
        streams.append(stream)
    for k in range(2):
        resumed = datamodule(folder, seed=5).build_loader("train", shard_id=k, num_shards=2)
        resumed.load_state_dict(state)
        rest = batches(resumed) + batches(resumed)  # rest of epoch 1, then epoch 2
        assert len(rest) == 2 * n - 2 and rest == streams[k][n + 2:], f"shard {k}"


@needs_dali
def test_datamodule_shards_via_build_loader(folder):
    dm = datamodule(folder)
    dm.setup("fit")
    shards = [dm.build_loader("train", shard_id=k, num_shards=2) for k in range(2)]
    assert len(shards[0]) == len(shards[1])
    labels = sorted(torch.cat(epoch(shards[0])[1]).tolist() + torch.cat(epoch(shards[1])[1]).tolist())
    assert labels == sorted(label for _, label in dm.layout.train.samples)
    with pytest.raises(ValueError, match="shard_id"):
        dm.build_loader("train", shard_id=2, num_shards=2)


@needs_dali
def test_dali_unfinished_epoch_restarts(folder):
    dm = datamodule(folder)
    dm.setup("validate")
    loader = dm.val_dataloader()
    next(iter(loader))  # like Lightning's sanity check: leave the epoch unfinished
    assert len(epoch(loader)[1]) == len(loader)
    assert sum(len(y) for y in epoch(loader)[1]) == NUM_CLASSES * N_VAL
    assert loader.rebuilds == 1


@needs_dali
def test_dali_and_torchvision_val_agree(folder):
    pairs = []
    for backend in ("dali", "torchvision"):
        dm = datamodule(folder, backend=backend, num_threads=1)
        dm.setup("validate")
        xs, ys = epoch(dm.val_dataloader())
        pairs.append((torch.cat(xs), torch.cat(ys)))
    (xd, yd), (xt, yt) = pairs
    assert torch.equal(yd, yt)  # same order, same labels
    assert xd.shape == xt.shape
    mad = (xd - xt).abs().mean().item()
    assert mad < VAL_AGREEMENT_TOL, mad


def test_dali_auto_device_is_cpu_without_gpu(folder):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    dm = ImageNetDataModule(str(folder), backend="torchvision", dali_device="auto")
    assert dm.resolved_dali_device() == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        ImageNetDataModule(str(folder), backend="torchvision", dali_device="gpu").resolved_dali_device()


@pytest.mark.skipif(not torch.cuda.is_available() or not dali_backend.dali_available(), reason="needs a GPU and DALI")
def test_dali_gpu_mixed(folder):  # pragma: no cover - no GPU in CI
    dm = datamodule(folder, dali_device="gpu")
    dm.setup("fit")
    for x, _y in dm.train_dataloader():
        assert x.is_cuda and x.shape[1:] == (3, SIZE, SIZE)
    xs, ys = epoch(dm.val_dataloader())
    assert torch.equal(dominant_channel(torch.cat(xs)).cpu(), torch.cat(ys).cpu() % 3)


# ------------------------------------------------------------------------------------------ torchvision
def test_torchvision_backend(folder):
    dm = datamodule(folder, backend="torchvision")
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train, torch.utils.data.DataLoader) and len(train) == math.ceil(18 / BATCH)
    assert train.dataset.classes == [class_name(k) for k in range(NUM_CLASSES)]
    x, y = torch.cat(epoch(train)[0]), torch.cat(epoch(train)[1])
    assert x.shape == (18, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.long
    assert LOW - 1e-4 <= x.min() and x.max() <= HIGH + 1e-4
    xv, yv = (torch.cat(t) for t in epoch(val))
    assert torch.equal(dominant_channel(xv), yv % 3)


# ------------------------------------------------------------------------------------------------ errors
def test_dali_missing_gives_install_hint(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[dali\]"):
        ImageNetDataModule(str(folder), backend="dali")
    ImageNetDataModule(str(folder), backend="torchvision")  # the fallback needs no DALI


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="backend"):
        ImageNetDataModule(str(folder), backend="pil")
    with pytest.raises(ValueError, match="dali_device"):
        ImageNetDataModule(str(folder), dali_device="tpu")
    with pytest.raises(ValueError, match="val_resize"):
        ImageNetDataModule(str(folder), backend="torchvision", image_size=64, val_resize=32)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_layout_errors(folder, tmp_path, backend):
    if backend == "dali" and not dali_backend.dali_available():
        pytest.skip("needs the [dali] extra")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datamodule(tmp_path / "nowhere", backend).setup("fit")

    root = _copy(folder, tmp_path)
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=r"missing val/"):
        datamodule(root, backend).setup("fit")
    shutil.rmtree(root)

    root = _copy(folder, tmp_path)
    shutil.rmtree(root / "train")
    with pytest.raises(FileNotFoundError, match=r"missing train/"):
        datamodule(root, backend).setup("fit")
    shutil.rmtree(root)

    root = _copy(folder, tmp_path)
    for f in os.listdir(root / "train" / class_name(1)):
        os.remove(root / "train" / class_name(1) / f)
    with pytest.raises(ValueError, match=rf"hold no image.*{class_name(1)}"):
        datamodule(root, backend).setup("fit")
    shutil.rmtree(root)

    root = _copy(folder, tmp_path)
    os.rename(root / "val" / class_name(2), root / "val" / "n99999999")
    with pytest.raises(ValueError, match=rf"different class folders.*only in train/: {class_name(2)}; only in val/: n99999999"):
        datamodule(root, backend).setup("fit")
    shutil.rmtree(root)

    root = _copy(folder, tmp_path)  # raw ImageNet val: all JPEGs directly in val/
    for k in range(NUM_CLASSES):
        for f in os.listdir(root / "val" / class_name(k)):
            os.rename(root / "val" / class_name(k) / f, root / "val" / f)
        os.rmdir(root / "val" / class_name(k))
    with pytest.raises(ValueError, match="no class sub-folders.*6 images lie directly in it"):
        datamodule(root, backend).setup("fit")


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_not_an_image_is_named_at_setup(folder, tmp_path, backend):
    if backend == "dali" and not dali_backend.dali_available():
        pytest.skip("needs the [dali] extra")
    root = _copy(folder, tmp_path)
    bad = root / "train" / class_name(1) / "broken.JPEG"
    bad.write_bytes(b"this is not a JPEG" * 20)
    with pytest.raises(CorruptImageError, match="broken.JPEG"):
        datamodule(root, backend).setup("fit")


@needs_dali
def test_truncated_jpeg_is_named_by_dali(folder, tmp_path):
    root = _copy(folder, tmp_path)
    bad = root / "val" / class_name(0) / f"{class_name(0)}_val_1.JPEG"
    _truncate(bad)
    dm = datamodule(root)  # the header check passes; the decode fails in the pipeline
    dm.setup("validate")
    with pytest.raises(CorruptImageError, match=f"{class_name(0)}_val_1.JPEG"):
        epoch(dm.val_dataloader())
    with pytest.raises(CorruptImageError, match=f"{class_name(0)}_val_1.JPEG"):
        datamodule(root, verify_images="full").setup("validate")


@needs_dali
def test_garbage_without_upfront_check_is_found_after_dali_fails(folder, tmp_path):
    root = _copy(folder, tmp_path)
    (root / "val" / class_name(2) / "zz_garbage.JPEG").write_bytes(b"\xff\xd8 not really" * 50)
    dm = datamodule(root, verify_images="none")
    dm.setup("validate")
    with pytest.raises(CorruptImageError, match="zz_garbage.JPEG"):
        epoch(dm.val_dataloader())


def test_truncated_jpeg_is_named_by_torchvision_worker(folder, tmp_path):
    root = _copy(folder, tmp_path)
    _truncate(root / "val" / class_name(2) / f"{class_name(2)}_val_0.JPEG")
    dm = datamodule(root, backend="torchvision")
    dm.setup("validate")
    with pytest.raises(Exception, match=f"{class_name(2)}_val_0.JPEG"):
        epoch(dm.val_dataloader())
