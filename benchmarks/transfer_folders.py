"""Build small image folders unlike CIFAR-10, to check that the built-in default transfers.

* ``gray3``: three CIFAR-10 classes (cat, ship, frog) as 24 px grayscale images, 600 training and
  200 test images per class (the first files in sorted order of each class folder).
* ``shapes``: generated 28 px colour images of four shapes (disc, square, triangle, cross) at a
  random size, position and colour on a noisy background of another colour; 500 training and
  150 test images per class, from a fixed seed.

Each folder has ``train/<class>/*.png`` and ``test/<class>/*.png`` (the layout of
``data.dataset=imagefolder``)::

    python benchmarks/transfer_folders.py --cifar $NOCOLLAPSE_CIFAR10 --out /tmp/folders
    nocollapse train --set data.dataset=imagefolder data.root=/tmp/folders/shapes train.epochs=15
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

GRAY_CLASSES = ("cat", "ship", "frog")
SHAPES = ("disc", "square", "triangle", "cross")


def build_gray3(cifar: Path, out: Path, per_class: dict[str, int], size: int = 24) -> None:
    from PIL import Image

    for split, count in per_class.items():
        for name in GRAY_CLASSES:
            target = out / split / name
            target.mkdir(parents=True, exist_ok=True)
            for index, path in enumerate(sorted((cifar / split / name).iterdir())[:count]):
                image = Image.open(path).convert("L").resize((size, size), Image.BICUBIC)
                image.save(target / f"{index:05d}.png")


def draw_shape(shape: str, rng: random.Random, size: int):
    from PIL import Image, ImageDraw

    background = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    pixels = image.load()
    for x in range(size):
        for y in range(size):
            pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in background)
    while True:
        colour = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(colour, background)) > 180:
            break
    extent = rng.randint(size // 3, int(size * 0.8))
    x0, y0 = rng.randint(0, size - extent), rng.randint(0, size - extent)
    x1, y1 = x0 + extent, y0 + extent
    draw = ImageDraw.Draw(image)
    if shape == "disc":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)
    else:
        bar = max(2, extent // 4)
        middle_x, middle_y = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((middle_x - bar // 2, y0, middle_x + bar // 2, y1), fill=colour)
        draw.rectangle((x0, middle_y - bar // 2, x1, middle_y + bar // 2), fill=colour)
    return image


def build_shapes(out: Path, per_class: dict[str, int], size: int = 28, seed: int = 0) -> None:
    rng = random.Random(seed)
    for split, count in per_class.items():
        for shape in SHAPES:
            target = out / split / shape
            target.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                draw_shape(shape, rng, size).save(target / f"{index:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, default=os.environ.get("NOCOLLAPSE_CIFAR10"),
                        help="CIFAR-10 as train/<class>/*.jpg and test/<class>/*.jpg (for gray3)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.cifar:
        build_gray3(Path(args.cifar), args.out / "gray3", {"train": 600, "test": 200})
    build_shapes(args.out / "shapes", {"train": 500, "test": 150})
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
