"""NVIDIA DALI pipelines for ImageNet-style folders and a loader that Lightning can iterate.

Needs the ``[dali]`` extra (``pip install -e .[dali]``, i.e. ``nvidia-dali-cuda120``). Nothing here imports
DALI at module import time; :func:`require_dali` gives the install hint.

* train: ``fn.readers.file`` (global shuffle each epoch, sharded, ``pad_last_batch``) ->
  ``fn.decoders.image_random_crop`` (area 0.08-1, aspect 3/4-4/3) -> ``fn.resize`` to ``image_size`` ->
  ``fn.crop_mirror_normalize`` (flip p=0.5, ImageNet mean/std, CHW float32).
* val: ``fn.decoders.image`` -> ``fn.resize(resize_shorter=val_resize)`` -> center crop ``image_size`` ->
  normalize.
* ``device="gpu"``: ``mixed`` decoding (nvJPEG) on GPU ``device_id``, the rest on the GPU;
  ``device="cpu"``: everything on the CPU, pipeline built with ``device_id=None``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from lightning_asyncpred.data.folder import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, find_undecodable

DALI_INSTALL_HINT = (
    "backend='dali' needs NVIDIA DALI, which is not installed: install the extra with "
    "`pip install -e .[dali]` (or `pip install nvidia-dali-cuda120`), or use --data.backend torchvision"
)
READER_NAME = "Reader"

# DeepLearningExamples' nvJPEG preallocation for ImageNet-size JPEGs (DALI's defaults: 16 MiB and 8 MiB).
# Per decoding thread: one device buffer (~201 MiB) and two pinned host buffers (~134 MiB each).
NVJPEG_PADDING = {"device_memory_padding": 211025920, "host_memory_padding": 140544512}


def require_dali() -> None:
    """Raise ``ImportError`` with the install command when DALI is missing."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as exc:
        raise ImportError(DALI_INSTALL_HINT) from exc


def dali_available() -> bool:
    try:
        require_dali()
    except ImportError:
        return False
    return True


def build_pipeline(
    files: Sequence[str],
    labels: Sequence[int],
    *,
    train: bool,
    batch_size: int,
    num_threads: int,
    device: str,
    device_id: Optional[int],
    shard_id: int,
    num_shards: int,
    image_size: int,
    val_resize: int,
    seed: int,
    checkpointing: bool = False,
    checkpoint: Optional[str] = None,
    nvjpeg_padding: bool = False,
    source: Optional[Callable[[], Iterator[tuple[list, list]]]] = None,
) -> Any:
    """Build (and return) the train or val DALI pipeline over ``files`` with ``labels``.

    Training order: DALI's ``shuffle_after_epoch`` draws every epoch's permutation from a fixed seed of its
    own (so that all shards agree) and ignores ``seed``; the file list is therefore first permuted with
    ``seed`` (identically on every rank), so the order of every epoch depends on ``seed``.

    ``checkpointing=True`` enables DALI's own checkpointing (reader position and shuffling, random operators'
    states); ``checkpoint`` restores a pipeline from one (see :class:`ResumableDALILoader`).
    ``nvjpeg_padding`` (``mixed`` decoding only): preallocate nvJPEG buffers for large images
    (:data:`NVJPEG_PADDING`: per decoding thread one device buffer and two pinned host buffers of these sizes).
    ``source``: instead of the file reader, ``fn.external_source`` over this generator function, which yields
    ``(encoded images, labels)`` per batch and ends with the epoch (the shared batch pool: :func:`pool_source`);
    ``files``, ``shard_id`` and ``num_shards`` are then unused.
    """
    require_dali()
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "gpu"):
        raise ValueError(f"DALI device must be 'cpu' or 'gpu', got {device!r}")
    decoder_device = "mixed" if device == "gpu" else "cpu"
    decoder_kwargs: dict[str, Any] = dict(NVJPEG_PADDING) if device == "gpu" and nvjpeg_padding else {}
    if train:
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    mean = [255.0 * m for m in IMAGENET_MEAN]
    std = [255.0 * s for s in IMAGENET_STD]

    def read():
        if source is not None:  # one call per batch; the generator's end is the epoch's end
            return fn.external_source(source=source, num_outputs=2, batch=True, cycle="raise", dtype=[types.UINT8, types.INT32])
        return fn.readers.file(
            files=list(files),
            labels=list(labels),
            name=READER_NAME,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            # a new global permutation every epoch; identical on every shard (same seed), so the shards
            # partition it: each sample once per epoch over all ranks
            shuffle_after_epoch=train,
            random_shuffle=False,
            seed=seed,
        )

    @pipeline_def(enable_conditionals=False)
    def pipeline():
        jpegs, label = read()
        if train:
            images = fn.decoders.image_random_crop(
                jpegs,
                device=decoder_device,
                output_type=types.RGB,
                random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=100,
                **decoder_kwargs,
            )
            images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
            crop: Optional[tuple[int, int]] = None
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **decoder_kwargs)
            images = fn.resize(images, resize_shorter=val_resize, interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = 0
            crop = (image_size, image_size)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            crop=crop,
            crop_pos_x=0.5,
            crop_pos_y=0.5,
            mean=mean,
            std=std,
            mirror=mirror,
        )
        return images, label

    if source is not None:
        checkpointing, checkpoint = False, None  # the pool's position is the state (see PooledDALILoader)
    pipe = pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "gpu" else None,
        seed=seed,
        exec_dynamic=True,
        enable_checkpointing=checkpointing or checkpoint is not None,
        checkpoint=checkpoint,
    )
    pipe.build()
    return pipe


_FILE_IN_MESSAGE = re.compile(r"Failed to decode sample[^:]*:\s*(\S+)")


class DALILoader:
    """Iterate a DALI pipeline as ``(images, labels)`` tuples (labels ``torch.long`` of shape ``(N,)``).

    ``len()`` is the number of batches of this shard per epoch (``reader_name``; the last batch is partial
    and holds no reader padding). With equal shard sizes (``ImageNetDataModule`` pads the file list to a
    multiple of the number of shards, see ``pad_to_multiple``) every shard has the same number of batches and
    none is empty. ``iter()`` starts a new
    epoch. If the previous epoch was left unfinished (Lightning's sanity check, ``limit_*_batches``), the
    pipeline is rebuilt instead of resuming mid-epoch (the next seed is used, the same on all ranks).

    A decode error inside the pipeline is re-raised as :class:`CorruptImageError` that names the file: from
    DALI's message when it names it, else by decoding this shard's files with PIL to find it.
    """

    def __init__(
        self,
        build: Callable[..., Any],
        files: Sequence[str],
        batch_size: int,
        num_threads: int = 2,
        labels: Optional[Sequence[int]] = None,
        seed: int = 0,
    ) -> None:
        self._build = build
        self._seed = seed
        self._files = list(files)
        self._labels = list(labels) if labels is not None else None
        self._batch_size = batch_size
        self._num_threads = num_threads
        self._iterator: Any = None
        self._pipe: Any = None
        self._builds = 0
        self._mid_epoch = False
        self._start()

    _reader_name: Optional[str] = READER_NAME

    def _build_pipe(self, generation: int, checkpoint: Optional[str]) -> Any:
        return self._build(generation) if checkpoint is None else self._build(generation, checkpoint)

    def _start(self, generation: Optional[int] = None, checkpoint: Optional[str] = None) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.close()
        generation = self._builds if generation is None else generation
        self._pipe = self._build_pipe(generation, checkpoint)
        self._builds = generation + 1
        self._iterator = DALIGenericIterator(
            self._pipe,
            ["images", "labels"],
            reader_name=self._reader_name,
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=self._reader_name is not None,
            prepare_first_batch=False,
        )
        self._mid_epoch = False

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def rebuilds(self) -> int:
        """How many times the pipeline was rebuilt after an unfinished epoch."""
        return self._builds - 1

    def __len__(self) -> int:
        return len(self._iterator)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator is None or self._mid_epoch:
            self._start()
        self._mid_epoch = True
        while True:
            try:
                out = next(self._iterator)
            except StopIteration:
                self._mid_epoch = False
                return
            except RuntimeError as exc:
                self._mid_epoch = True
                raise self._corrupt_error(exc) from exc
            data = out[0]
            yield data["images"], data["labels"].reshape(-1).long()

    def _corrupt_error(self, exc: RuntimeError) -> Exception:
        message = str(exc)
        if "decode" not in message.lower() and "nvImageCodec" not in message:
            return exc
        match = _FILE_IN_MESSAGE.search(message)
        if match:
            return CorruptImageError(f"DALI cannot decode image file {match.group(1)} (remove or replace it):\n{message}")
        problems = find_undecodable(self._files, self._num_threads)
        if problems:
            return CorruptImageError(
                "DALI failed to decode an image; PIL cannot decode these file(s) of this shard (remove or replace "
                "them):\n  " + "\n  ".join(problems[:20]) + f"\nDALI said:\n{message}"
            )
        return CorruptImageError(f"DALI failed to decode an image of this shard (PIL decodes all of them):\n{message}")

    def close(self) -> None:
        self._iterator = None
        self._pipe = None


class ResumableDALILoader(DALILoader):
    """A :class:`DALILoader` that Lightning resumes mid-epoch (it has ``state_dict``/``load_state_dict``).

    Its state is DALI's own checkpoint of the pipeline after the batches consumed so far (the reader's
    position and epoch shuffling, the random operators' states; ``DALIGenericIterator.checkpoints()``
    excludes what DALI prefetched) with the pipeline's build generation. ``build(generation, checkpoint)``
    must build the pipeline with ``checkpointing=True`` and restore ``checkpoint`` when one is given.

    A Lightning checkpoint holds rank 0's state, which every rank loads: DALI's reader state is a position
    in the shard and the operators' seeds are the same on every rank, so with equal shard sizes each rank
    continues its own shard from it (tested in ``tests/test_imagenet_data.py``).
    """

    def state_dict(self) -> dict[str, Any]:
        if self._iterator is None:
            self._start()
        return {"generation": self._builds - 1, "checkpoint": self._iterator.checkpoints()[0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._start(int(state["generation"]), state["checkpoint"])

    def with_pool(self, make_pool: Callable[..., Any]) -> "PooledDALILoader":
        """This loader drawing its batches from the shared batch pool (called by the p2p strategy)."""
        if self._labels is None:
            raise ValueError("with_pool() needs the loader's labels (DALILoader(..., labels=...))")
        return PooledDALILoader(
            self._build, self._files, self._labels, self._batch_size, make_pool, self._num_threads, seed=self._seed
        )


def pool_source(pool: Any, files: Sequence[str], labels: Sequence[int]) -> Callable[[], Iterator[tuple[list, list]]]:
    """A generator function for ``fn.external_source``: per batch drawn from ``pool``, its encoded files and labels."""
    import numpy as np

    def batches() -> Iterator[tuple[list, list]]:
        for j in pool.draws():
            index = pool.batch(j)
            yield [np.fromfile(files[i], dtype=np.uint8) for i in index], [np.array([labels[i]], dtype=np.int32) for i in index]

    return batches


class PooledDALILoader(DALILoader):
    """The training pipeline fed from a :class:`~lightning_asyncpred.data.pool.BatchPool` by ``fn.external_source``
    (files read in the pipeline's feeding thread; decoding, ``mixed`` on a GPU, and augmentation as with the reader).

    It has no length (each rank's share of the epoch depends on its speed) and its ``sampler`` is the pool (Lightning
    sets its epoch). Its state is the pool's position (resume continues the epoch; DALI's random augmentation
    state is not restored). ``build(generation, source=...)`` builds the pipeline over ``source``.
    """

    _reader_name = None

    def __init__(
        self,
        build: Callable[..., Any],
        files: Sequence[str],
        labels: Sequence[int],
        batch_size: int,
        make_pool: Callable[..., Any],
        num_threads: int = 2,
        seed: int = 0,
    ) -> None:
        # make_pool(num_samples, batch_size, drop_last, shuffle, seed): each epoch permuted with seed + epoch
        self.sampler = make_pool(len(files), batch_size, False, True, seed)
        self._source = pool_source(self.sampler, list(files), list(labels))
        super().__init__(build, files, batch_size, num_threads, labels=labels, seed=seed)

    def _build_pipe(self, generation: int, checkpoint: Optional[str]) -> Any:
        return self._build(generation, source=self._source)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # no auto-reset: a reset makes DALI prefetch, i.e. draw from the pool, so it must come after Lightning set
        # this epoch (before iter); a finished epoch's iterator is reset here
        if self._iterator is not None and not self._mid_epoch and self._ended:
            self._iterator.reset()
        self._ended = True
        yield from super().__iter__()

    _ended = False

    def __len__(self) -> int:
        raise TypeError("a shared batch pool loader has no length: each rank's share of the epoch depends on its speed")

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.sampler.load_state_dict(state)
