"""A tiny ImageNet-layout folder written with PIL, for the ImageNet data / recipe tests.

Class ``k`` (folder ``n0000000k``) has colour channel ``k % 3`` bright and the others dark, with a smooth
texture, so an image's label can be read back from its pixels after any crop, flip or resize.
"""

from __future__ import annotations

import os

import numpy as np

# (height, width): varied sizes and aspect ratios, all >= 40 pixels
SIZES = [(40, 56), (72, 48), (64, 64), (50, 90), (96, 80), (48, 40), (60, 100), (88, 66)]


def class_name(k: int) -> str:
    return f"n{k:08d}"


def make_image(label: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = 25 * np.sin(xx / 7.0 + phase[0]) * np.cos(yy / 9.0 + phase[1])
    img = np.full((height, width, 3), 45.0, dtype=np.float32)
    img[..., label % 3] = 200.0
    img += texture[..., None] + rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagenet_folder(root, num_classes: int = 3, n_train: int = 6, n_val: int = 2, seed: int = 0) -> str:
    """Write ``root/{train,val}/<class>/*.JPEG``; returns ``str(root)``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = str(root)
    count = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(num_classes):
            folder = os.path.join(root, split, class_name(k))
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                h, w = SIZES[count % len(SIZES)]
                count += 1
                Image.fromarray(make_image(k, h, w, rng)).save(os.path.join(folder, f"{class_name(k)}_{split}_{i}.JPEG"), quality=92)
    return root


def dominant_channel(images) -> "np.ndarray":
    """Per image (N, 3, H, W), normalized: the channel with the highest mean."""
    return images.mean(dim=(2, 3)).argmax(dim=1)
