"""Datasets by name, decoded and resized once into a uint8 tensor cache on disk.

Registered datasets:

``gtsrb``
    German Traffic Sign Recognition Benchmark (Stallkamp et al., IJCNN 2011), 43 classes. Accepts an
    ImageFolder layout (``ROOT/gtsrb/{train,test}/<class id>/*.png`` or ``ROOT/{train,test}/...``)
    and the official layout that ``torchvision.datasets.GTSRB`` downloads (``ROOT/gtsrb/GTSRB/...``).
    With ``download=True`` the official files are fetched (needs a network). No horizontal flips.
``cifar10`` / ``cifar100``
    Krizhevsky 2009, torchvision's format under ``ROOT`` (downloaded with ``download=True``).
``imagefolder``
    Any ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` folders of images.
``gtsrb_sample``
    A small stratified GTSRB subset shipped inside the package (``veil demo`` uses it); needs no
    ``ROOT`` and no network.

The cache key covers the folder's absolute path, the file list with sizes and modification times, and
the image size, so a changed dataset is decoded again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from veil.data.base import ImageDataset
from veil.errors import DatasetError
from veil.records import atomic_save_tensors, load_tensors
from veil.registry import Registry

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
SAMPLE_FILE = Path(__file__).with_name("sample") / "gtsrb_sample.npz"


Loaded = tuple[torch.Tensor, torch.Tensor, list[str]]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset loader provides.

    Attributes:
        name: registry name.
        hflip: whether horizontal flips keep the label (False for traffic signs).
        needs_root: whether a data folder must be given.
        loader: ``loader(root, split, image_size, download, cache_dir) -> (images uint8 NCHW, labels,
            classes)``.
    """

    name: str
    hflip: bool
    needs_root: bool
    loader: Callable[[Path | None, str, int, bool, Path], Loaded]


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def _register(info: DatasetInfo) -> DatasetInfo:
    return DATASETS.register(info.name)(info)


def default_cache_dir() -> Path:
    """``$VEIL_CACHE`` or ``~/.cache/veil``."""
    return Path(os.environ.get("VEIL_CACHE", Path.home() / ".cache" / "veil"))


# ----------------------------------------------------------------------------- decoding helpers
def to_rgb8(im: Image.Image) -> Image.Image:
    """``im`` as an 8-bit RGB image, whatever its PIL mode.

    PIL's own ``convert("RGB")`` clips wider integer and float modes to 255, so a 16-bit greyscale
    PNG (mode ``I;16``) comes out white. Here 16-bit modes (``I;16*``, and ``I``, which PIL uses
    for 16-bit PNG and TIFF data) are scaled by 255/65535; ``F`` (32-bit float) is read as
    ``[0, 1]`` when its values lie there and as grey levels otherwise; every other mode (``1``,
    ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, ...) goes through PIL's
    conversion, which drops alpha and applies the palette.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64) * (255.0 / 65535.0)
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
    else:
        return im if mode == "RGB" else im.convert("RGB")
    grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return grey.convert("RGB")


def _decode(path: Path, image_size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = to_rgb8(im)
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _check_decoded_size(count: int, image_size: int) -> None:
    """Refuse to decode ``count`` images at ``image_size`` when they cannot fit in memory."""
    from veil.resources import available_bytes, format_bytes, image_bytes

    needed, free = image_bytes(count, image_size), available_bytes("cpu")  # exact, not an estimate
    if needed > free:
        raise DatasetError(f"{count} images at image size {image_size} need {format_bytes(needed)} decoded, more than "
                           f"the {format_bytes(free)} of memory available; lower --image-size")


def _resize_array(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resize NHWC uint8 images with PIL (bilinear) if needed."""
    if images.shape[1] == image_size and images.shape[2] == image_size:
        return images
    _check_decoded_size(images.shape[0], image_size)
    out = np.empty((images.shape[0], image_size, image_size, images.shape[3]), dtype=np.uint8)
    for i, img in enumerate(tqdm(images, desc=f"resize to {image_size}", leave=False, disable=None)):
        out[i] = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.Resampling.BILINEAR))
    return out


def _to_tensors(images: np.ndarray, labels: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return x, y


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Each class folder of a split (by name, sorted) with its image files (sorted); a class folder
    without images is an error (it would add a class no image has)."""
    if not split_dir.is_dir():
        raise DatasetError(f"dataset folder {split_dir} does not exist")
    out: dict[str, list[Path]] = {}
    for name in sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = [Path(e.path) for e in sorted(os.scandir(split_dir / name), key=lambda e: e.name)
                  if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise DatasetError(f"class folder {split_dir / name} holds no images; remove it or add its images")
        out[name] = images
    if not out:
        raise DatasetError(f"dataset folder {split_dir} holds no class folders")
    return out


def _list_class_folders(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """The classes and ``(file, label)`` pairs of an ImageFolder split. Labels are the positions of
    the folder *names* in ``classes`` (the training split's class names; default: this split's),
    so a test split that lacks a class or orders its folders differently is still labelled right;
    a class folder the training split lacks is an error."""
    found = _class_files(split_dir)
    if classes is None:
        classes = list(found)
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
            raise DatasetError(f"{split_dir} has class folder(s) the training split lacks: {shown}")
    index = {c: i for i, c in enumerate(classes)}
    files = [(path, index[name]) for name, paths in found.items() for path in paths]
    return classes, files


def _decode_files(files: list[tuple[Path, int]], image_size: int, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_decoded_size(len(files), image_size)
    arr = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    for i, (path, label) in enumerate(tqdm(files, desc=desc, unit="img", leave=False, disable=None)):
        try:
            arr[i] = _decode(path, image_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from None
        labels[i] = label
    return _to_tensors(arr, labels)


def _folder_key(files: list[tuple[Path, int]], image_size: int) -> str:
    h = hashlib.sha1()
    h.update(str(image_size).encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{path.resolve()}|{label}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def _cached_decode(files: list[tuple[Path, int]], image_size: int, tag: str, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``files`` once; later calls read the uint8 tensors from ``cache_dir``."""
    cache = cache_dir / f"{tag}-{image_size}-{_folder_key(files, image_size)}.safetensors"
    if cache.is_file():
        try:
            t = load_tensors(cache)
            x, y = t["images"], t["labels"]
            expected = torch.tensor([label for _, label in files], dtype=torch.long)
            if x.dtype != torch.uint8 or tuple(x.shape) != (len(files), 3, image_size, image_size) or not torch.equal(y, expected):
                raise ValueError(f"it holds {tuple(x.shape)} {x.dtype} images and {y.numel()} labels that do not "
                                 f"match the {len(files)} files")
            log.info("loaded %s from cache %s", tag, cache)
            return x, y
        except Exception as exc:  # a broken or mismatched cache is rebuilt, never trusted
            log.warning("ignoring cache %s (%s)", cache, exc)
    x, y = _decode_files(files, image_size, desc=f"decode {tag}")
    try:
        atomic_save_tensors(cache, {"images": x, "labels": y})
    except OSError as exc:
        log.warning("could not write dataset cache %s (%s)", cache, exc)
    return x, y


def _load_imagefolder_split(split_dir: Path, image_size: int, name: str, cache_dir: Path) -> Loaded:
    """One split of an ImageFolder layout; every split but ``train`` takes its class names (and
    label numbers) from the ``train`` folder beside it."""
    train_dir = split_dir.parent / "train"
    classes = list(_class_files(train_dir)) if split_dir.name != "train" and train_dir.is_dir() else None
    classes, files = _list_class_folders(split_dir, classes)
    x, y = _cached_decode(files, image_size, f"{name}-{split_dir.name}", cache_dir)
    return x, y, classes


# ----------------------------------------------------------------------------- loaders
def _gtsrb(root: Path | None, split: str, image_size: int, download: bool, cache_dir: Path) -> Loaded:
    assert root is not None
    for base in (root / "gtsrb", root):
        if (base / split).is_dir() and any((base / split).iterdir()):
            return _load_imagefolder_split(base / split, image_size, "gtsrb", cache_dir)
    official = root / "gtsrb" / "GTSRB"
    if official.is_dir() or download:
        return _gtsrb_official(root, split, image_size, download, cache_dir)
    raise DatasetError(
        f"no GTSRB data under {root}: expected {root}/gtsrb/{split}/<class>/*.png (ImageFolder layout) "
        f"or torchvision's official layout {root}/gtsrb/GTSRB (use --download to fetch it)"
    )


def _gtsrb_official(root: Path, split: str, image_size: int, download: bool, cache_dir: Path) -> Loaded:
    """torchvision's layout (``ROOT/gtsrb/GTSRB/Training/<class>/*.ppm``, ``Final_Test/Images``
    with ``ROOT/gtsrb/GT-final_test.csv``), downloaded by torchvision when ``download``."""
    from torchvision.datasets import GTSRB

    try:
        ds = GTSRB(str(root), split=split, download=download)
    except (RuntimeError, OSError) as exc:
        raise DatasetError(f"GTSRB official files not found under {root}/gtsrb ({exc}); use --download") from exc
    files = [(Path(p), int(c)) for p, c in ds._samples]  # the (path, label) pairs torchvision found
    if not files:
        raise DatasetError(f"GTSRB official {split} folder under {root}/gtsrb holds no images")
    x, y = _cached_decode(files, image_size, f"gtsrb-official-{split}", cache_dir)
    return x, y, [f"{i:05d}" for i in range(43)]


def _cifar(cls_name: str) -> Callable[[Path | None, str, int, bool, Path], Loaded]:
    def loader(root: Path | None, split: str, image_size: int, download: bool, cache_dir: Path) -> Loaded:
        import torchvision.datasets as tvd

        assert root is not None
        cls = getattr(tvd, cls_name)
        try:
            ds = cls(str(root), train=(split == "train"), download=download)
        except RuntimeError as exc:
            raise DatasetError(f"{cls_name} files not found under {root} ({exc}); use --download to fetch them") from exc
        images = _resize_array(np.asarray(ds.data, dtype=np.uint8), image_size)
        x, y = _to_tensors(images, ds.targets)
        return x, y, list(ds.classes)

    return loader


def _imagefolder(root: Path | None, split: str, image_size: int, download: bool, cache_dir: Path) -> Loaded:
    assert root is not None
    return _load_imagefolder_split(root / split, image_size, "imagefolder", cache_dir)


def _gtsrb_sample(root: Path | None, split: str, image_size: int, download: bool, cache_dir: Path) -> Loaded:
    """The bundled sample: a PNG mosaic per split (see ``scripts/make_gtsrb_sample.py``)."""
    if not SAMPLE_FILE.is_file():
        raise DatasetError(f"the bundled GTSRB sample {SAMPLE_FILE} is missing from the installation")
    with np.load(SAMPLE_FILE, allow_pickle=False) as z:
        png = z[f"{split}_png"].tobytes()
        labels = z[f"{split}_labels"].astype(np.int64)
        classes = [str(c) for c in z["classes"]]
        tile_h, tile_w, cols = (int(v) for v in z["tile"])
    with Image.open(io.BytesIO(png)) as im:
        canvas = np.asarray(im.convert("RGB"), dtype=np.uint8)
    n = len(labels)
    images = np.empty((n, tile_h, tile_w, 3), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        images[i] = canvas[r * tile_h : (r + 1) * tile_h, k * tile_w : (k + 1) * tile_w]
    x, y = _to_tensors(_resize_array(images, image_size), labels)
    return x, y, classes


_register(DatasetInfo("gtsrb", hflip=False, needs_root=True, loader=_gtsrb))
_register(DatasetInfo("cifar10", hflip=True, needs_root=True, loader=_cifar("CIFAR10")))
_register(DatasetInfo("cifar100", hflip=True, needs_root=True, loader=_cifar("CIFAR100")))
_register(DatasetInfo("imagefolder", hflip=True, needs_root=True, loader=_imagefolder))
_register(DatasetInfo("gtsrb_sample", hflip=False, needs_root=False, loader=_gtsrb_sample))


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int = 32,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageDataset:
    """Load a registered dataset split as an :class:`ImageDataset` of uint8 images.

    Args:
        name: a name from :func:`list_datasets`.
        root: the data folder (not needed for ``gtsrb_sample``).
        split: ``"train"`` or ``"test"``.
        image_size: square side length images are resized to (once, then cached).
        download: fetch the dataset if it is missing (torchvision formats only; needs a network).
        cache_dir: where decoded tensors are cached (default ``$VEIL_CACHE`` or ``~/.cache/veil``).
    """
    info = DATASETS.get(name)
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    if image_size < 8:
        raise DatasetError(f"image size {image_size} is too small (at least 8)")
    path: Path | None = None
    if info.needs_root:
        if root is None:
            raise DatasetError(f"dataset {name!r} needs a data folder (--data-root)")
        path = Path(root).expanduser()
        if path.exists() and not path.is_dir():
            raise DatasetError(f"data folder {path} is a file, not a folder")
        if not path.is_dir() and not download:
            raise DatasetError(f"data folder {path} does not exist")
        if download:
            path.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    images, labels, classes = info.loader(path, split, image_size, download, cache)
    if images.shape[0] == 0:
        raise DatasetError(f"dataset {name!r} split {split!r} under {path} is empty")
    return ImageDataset(images, labels, classes, name, info.hflip)


def list_datasets() -> list[str]:
    return DATASETS.names()
