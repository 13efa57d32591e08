"""Photo-like synthetic images, for `make local`, the tests and the benchmark.

Smooth colour fields with shapes and grain, JPEG (quality 90) and PNG, portrait and
landscape: close enough to photos that decode, resize and model costs are realistic.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo_like(seed: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A deterministic RGB image of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    # Low-frequency colour field: a coarse random grid, upsampled smoothly.
    coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    grain = rng.normal(0, 6, size=(h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def make_samples(folder: str, count: int = 64, broken: bool = True) -> list[str]:
    """Writes ``count`` images (2/3 JPEG, 1/3 PNG; every 4th portrait) and one truncated JPEG.

    Returns:
        The paths written.
    """
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        size = (375, 500) if i % 4 == 3 else (500, 375)
        img = photo_like(i, size)
        if i % 3 == 2:
            path = os.path.join(folder, f"img_{i:04d}.png")
            img.save(path)
        else:
            path = os.path.join(folder, f"img_{i:04d}.jpg")
            img.save(path, quality=90)
        paths.append(path)
    if broken:
        # A JPEG cut in half: it must become an error row, not a half-grey image.
        path = os.path.join(folder, "broken.jpg")
        with open(paths[0], "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        paths.append(path)
    return paths
