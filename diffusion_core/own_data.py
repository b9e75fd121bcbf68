"""Your own labelled images: an ImageFolder tree or an .npz file, read into uint8 arrays.

``data.source: imagefolder``: ``data.root`` is torchvision's ImageFolder layout,
``root/<class name>/<image>`` (png, jpg, jpeg, bmp, gif, webp, tif, tiff); the class names are the
folder names in sorted order. Images are greyscale when every one is (modes 1, L, LA), else RGB.

``data.source: npz``: ``data.root`` is an .npz file holding either ``images`` (uint8 [N, H, W] or
[N, H, W, C]) and ``labels`` (int [N]), with optional ``classes`` (a name per label) and ``split``
(``train`` or ``test`` per image, to keep an official test set); or the Keras layout
``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optional ``classes``).

Without ``data.image_size`` every image must have one square size; with it each is resized (shorter
side, antialiased) and centre-cropped to that size. Anything wrong is a :class:`DataError` whose one
line names the file, before any training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GREY_MODES = ("1", "L", "LA")


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> [N, C, size, size]: the shorter side resized to ``size`` (bilinear,
    antialiased), then the centre cropped. Unchanged when already that size."""
    n, c, h, w = images.shape
    if h == w == size:
        return images
    scale = size / min(h, w)
    new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    out = []
    for chunk in np.array_split(np.arange(n), max(1, n // 2048)):
        x = torch.from_numpy(images[chunk]).float()
        x = F.interpolate(x, size=new_hw, mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
        out.append(x[:, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def _one_size(images: list[np.ndarray], files: list[Path], where: str) -> None:
    """Every image [C, H, W] has the first one's size, and it is square; else a one-line error."""
    h0, w0 = images[0].shape[1:]
    for img, f in zip(images, files):
        if img.shape[1:] != (h0, w0):
            raise DataError(f"{f}: {img.shape[2]}x{img.shape[1]} pixels, but {files[0]} is {w0}x{h0}; "
                            f"images must all be one size, or set data.image_size to resize them")
    if h0 != w0:
        raise DataError(f"{where}: images are {w0}x{h0} pixels, the network needs square ones: set data.image_size "
                        "to resize and centre-crop them")


def load_imagefolder(root: str, image_size: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images [N, C, S, S], int64 labels [N], class names) of an ImageFolder tree."""
    from PIL import Image, UnidentifiedImageError

    top = Path(root)
    if not top.is_dir():
        raise DataError(f"data.root={root!r}: no such folder (data.source imagefolder reads root/<class name>/<image files>)")
    classes = sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data.root={root!r}: no class folders in it (data.source imagefolder reads root/<class name>/<image files>)")
    files: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        found = sorted(p for p in (top / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"{top / name}: class folder {name!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [c] * len(found)
    pil = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                pil.append(im.copy())
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{f}: not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    mode = "L" if all(im.mode in GREY_MODES for im in pil) else "RGB"
    arrays = []
    for im in pil:
        a = np.asarray(im.convert(mode), dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    if image_size:
        arrays = [resize_images(a[None], image_size)[0] for a in arrays]
    else:
        _one_size(arrays, files, f"data.root={root!r}")
    return np.stack(arrays), np.asarray(labels, dtype=np.int64), classes


def _npz_images(path: str, key: str, images: np.ndarray) -> np.ndarray:
    """An npz member of images -> uint8 [N, C, H, W] (C 1 or 3), or a one-line error."""
    if images.dtype != np.uint8:
        raise DataError(f"{path}: {key!r} must be uint8 images (0-255), got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: {key!r} must be [N, H, W] or [N, H, W, C] with C 1 or 3, got shape {list(images.shape)}")
    return np.ascontiguousarray(images)


def _npz_labels(path: str, key: str, labels: np.ndarray, n: int, num_classes: int | None) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras's [N, 1]
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{path}: {key!r} holds {labels.shape[0] if labels.ndim else 0} labels for {n} images; they must match one to one")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {key!r} must be integer class indices, got dtype {labels.dtype}")
    hi = num_classes if num_classes is not None else int(labels.max(initial=0)) + 1
    bad = (labels < 0) | (labels >= hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: {key}[{i}] = {int(labels[i])} is out of range: labels must be in [0, {hi - 1}]"
                        + (f" (the file names {hi} classes)" if num_classes is not None else ""))
    return labels.astype(np.int64)


def load_npz(path: str, image_size: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, list[str]]:
    """(train images, train labels, test images or None, test labels or None, class names) of an .npz file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.root={path!r}: no such file (data.source npz reads an .npz with images and labels)")
    try:
        z = np.load(p, allow_pickle=False)
        members = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    names = [str(c) for c in members["classes"]] if "classes" in members else None
    if names is not None and len(set(names)) != len(names):
        raise DataError(f"{path}: 'classes' repeats a name: {names}")
    k = len(names) if names is not None else None
    if "images" in members and "labels" in members:
        x = _npz_images(path, "images", members["images"])
        y = _npz_labels(path, "labels", members["labels"], len(x), k)
        split = members.get("split")
        if split is None:
            parts = (x, y, None, None)
        else:
            split = np.asarray(split).astype(str)
            if split.shape != (len(x),) or not set(np.unique(split)) <= {"train", "test"}:
                raise DataError(f"{path}: 'split' must say 'train' or 'test' for each of the {len(x)} images")
            test = split == "test"
            parts = (x[~test], y[~test], x[test], y[test]) if test.any() else (x, y, None, None)
    elif all(key in members for key in ("x_train", "y_train")):
        x = _npz_images(path, "x_train", members["x_train"])
        y = _npz_labels(path, "y_train", members["y_train"], len(x), k)
        parts = (x, y, None, None)
        if "x_test" in members and "y_test" in members:
            xt = _npz_images(path, "x_test", members["x_test"])
            parts = (x, y, xt, _npz_labels(path, "y_test", members["y_test"], len(xt), k))
    else:
        raise DataError(f"{path}: needs 'images' and 'labels' (or 'x_train' and 'y_train'), it holds {sorted(members)}")
    x, y, xt, yt = parts
    if len(x) == 0:
        raise DataError(f"{path}: no training images in it")
    num_classes = k if k is not None else int(max(y.max(), -1 if yt is None else yt.max())) + 1
    names = names or [str(c) for c in range(num_classes)]
    missing = [names[c] for c in range(num_classes) if not (y == c).any()]
    if missing:
        raise DataError(f"{path}: class {missing[0]!r} has no training images")
    if xt is not None and xt.shape[1] != x.shape[1]:
        raise DataError(f"{path}: training images have {x.shape[1]} channels, test images {xt.shape[1]}; they must match")
    if image_size:
        x, xt = resize_images(x, image_size), None if xt is None else resize_images(xt, image_size)
    elif x.shape[2] != x.shape[3] or (xt is not None and xt.shape[1:] != x.shape[1:]):
        raise DataError(f"{path}: images are {x.shape[3]}x{x.shape[2]}" + ("" if xt is None else f" (test {xt.shape[3]}x{xt.shape[2]})")
                        + " pixels; the network needs one square size: set data.image_size to resize and centre-crop them")
    return x, y, xt, yt, names
