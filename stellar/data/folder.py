"""Image folders: flat, or one subfolder per class (the ImageFolder layout).

Unreadable or corrupt files are skipped: the first time any data-loading
process meets one, it prints one warning line naming it, and the item is
replaced by the next readable image. A folder with no readable image at all
raises DataError (a RuntimeError).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


class ImageFolderDataset(Dataset):
    """The images under `root`, with class labels when `root` has class subfolders.

    Labels: the index of the image's first-level subfolder in sorted order
    (`classes` lists the names), -1 for images directly in `root` and for a flat folder.

    Args:
        root: the folder.
        warn_dir: a folder where a marker per skipped file is kept, so that the
            warning is printed once across data-loader workers and ranks
            (default: a new temporary folder).
    """

    def __init__(self, root: str | Path, warn_dir: str | Path | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--data: {self.root} is not a folder")
        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        per_class = [(d.name, _images_under(d)) for d in subdirs]
        per_class = [(name, files) for name, files in per_class if files]
        self.classes = [name for name, _ in per_class]
        self.samples: list[tuple[str, int]] = [
            (str(p), -1)
            for p in sorted(self.root.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        for label, (_, files) in enumerate(per_class):
            self.samples += [(str(p), label) for p in files]
        if not self.samples:
            raise FileNotFoundError(
                f"--data: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}"
            )
        if warn_dir is None:
            warn_dir = tempfile.mkdtemp(prefix="stellar-skipped-")
        self.warn_dir = str(warn_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def _warn_once(self, path: str, err: Exception) -> None:
        os.makedirs(self.warn_dir, exist_ok=True)
        marker = os.path.join(self.warn_dir, hashlib.sha1(path.encode()).hexdigest())
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, path.encode() + b"\n")
        os.close(fd)
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"warning: skipping unreadable image {path}: {msg}", file=sys.stderr, flush=True)

    def read(self, index: int, min_size: int | None = None) -> Image.Image | None:
        """The RGB image of item `index`, or None (after one warning) when it cannot be read."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                if min_size is not None and img.format == "JPEG":
                    img.draft("RGB", (min_size, min_size))  # decode at a reduced scale
                return img.convert("RGB")
        except Exception as err:  # any decoder error means: skip this file
            self._warn_once(path, err)
            return None

    def load(self, index: int, min_size: int | None = None) -> tuple[Image.Image, int]:
        """(image, label) of item `index`, or of the next readable item when it is unreadable."""
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            img = self.read(i, min_size)
            if img is not None:
                return img, self.samples[i][1]
        raise DataError(f"--data: none of the {n} image files under {self.root} can be read")

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        import torch

        img, label = self.load(index)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {"image": arr.float() / 255.0, "label": label}
