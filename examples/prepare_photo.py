"""Turn a photo of a garment into what a Fashion-MNIST model was trained on, for ``POST /v1/predict/image``.

Fashion-MNIST images are a light garment, centred, on a black background, 28×28 grey (the
server resizes and converts channels, but never inverts). A photo is usually the opposite: a
darker object on a light table or wall. This script:

1. converts to grey;
2. inverts it when its border is lighter than its middle (a light background);
3. crops to the object (pixels clearly brighter than the background) and pads it to a square;
4. resizes to 28×28, the object filling the frame as in the data set, and writes a PNG.

Usage: python examples/prepare_photo.py PHOTO [PHOTO ...] --out-dir prepared/
then:  curl -F files=@prepared/PHOTO.png http://127.0.0.1:8000/v1/predict/image
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageOps

SIZE = 28


def prepare(photo: Image.Image, size: int = SIZE, threshold: int = 40) -> Image.Image:
    """A light-on-black, square, ``size``×``size`` grey image of the object in ``photo``."""
    grey = ImageOps.grayscale(photo)
    w, h = grey.size
    border = [
        *(grey.getpixel((x, 0)) for x in range(w)),
        *(grey.getpixel((x, h - 1)) for x in range(w)),
        *(grey.getpixel((0, y)) for y in range(h)),
        *(grey.getpixel((w - 1, y)) for y in range(h)),
    ]
    background = sorted(border)[len(border) // 2]  # the median border pixel
    if background > 127:  # a light background: Fashion-MNIST's is black
        grey = ImageOps.invert(grey)
        background = 255 - background
    mask = grey.point(lambda v: 255 if v > background + threshold else 0)
    box = mask.getbbox() or (0, 0, w, h)
    grey = grey.crop(box)
    side = max(grey.size)
    square = Image.new("L", (side, side), 0)
    square.paste(grey, ((side - grey.size[0]) // 2, (side - grey.size[1]) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--out-dir", type=Path, default=Path("prepared"))
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path in args.photos:
        try:
            with Image.open(path) as photo:
                out = args.out_dir / (path.stem + ".png")
                prepare(photo).save(out)
        except OSError as e:
            print(f"prepare_photo: {path}: {e}", file=sys.stderr)
            return 1
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
