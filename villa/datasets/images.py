"""Image files in, model batches out: the one place where villa decodes, resizes and batches images.

Preprocessing, stage 2, evaluation and zero-shot detection all read images through this module.

**Decoding.** Any file Pillow reads (PNG, JPEG, ...), any mode: greyscale, palette, RGBA (alpha dropped) and
CMYK become 8-bit RGB; 16-bit and float greyscale (e.g. X-rays) are min-max scaled to 0-255 per image. EXIF
orientation is NOT applied: boxes refer to the pixels as stored (as COCO's do). A file that is missing,
truncated or undecodable, or whose size differs from the annotations' ``image_size``, is a one-line
:class:`~villa.storage.errors.VillaError` naming the file.

**Resize policy** (:class:`ResizePolicy`, set per encoder by ``Encoder.image_min_side`` /
``Encoder.image_max_side``): with ``h, w`` the stored size, the scale ``s`` is 1, raised to
``min_side / min(h, w)`` when the shorter side is below ``min_side``, then lowered to ``max_side / max(h, w)``
when the longer side would exceed ``max_side``; the output is ``round(h * s) x round(w * s)`` (aspect kept),
by Pillow's bilinear filter (antialiased when shrinking; JPEGs shrunk 2x or more are decoded at reduced scale
first). Region boxes are scaled per axis by ``output / stored``, so they stay on the same pixels. DocMNIST
(84x84) is never resized by the default encoder.

**Batches.** The images of a batch are zero-padded at the bottom and right to the batch's largest height and
width, which leaves box coordinates unchanged; :func:`size_sorted_batches` groups images of similar size so
padding stays small (same-size datasets such as DocMNIST are never padded).

**Memory.** :class:`ImageStore` keeps the decoded (resized) images of a dataset in memory when they fit the
``image_cache_mb`` budget (a config key; small datasets then decode once), and otherwise decodes each batch
when it is asked for (in DataLoader workers when ``num_workers > 0``), so memory does not grow with the
dataset. Decoded images take height x width x 3 bytes: DocMNIST's 84 x 84 are 21 KB (a 30,000-budget train
split: 42 MB), 200 x 150 are 90 KB (the default 1 GiB holds about 11,900), COCO's 640 x 480 are 0.9 MB (about
1,100). Each split (train, val, test) is its own store with its own budget.

Choosing the settings (stage 2, evaluation):

* the defaults (``image_cache_mb=1024``, ``num_workers=0``) suit data that fits: every image is decoded once,
  and a batch is a slice of one array;
* ``image_cache_mb=0`` caps memory at one batch of images whatever the dataset's size (or lower the budget
  when several processes share the machine); decoding then costs every epoch, so add DataLoader workers
  (``num_workers=2``; one or two per spare core) to decode the next batches while the model trains. Workers
  are forked (sharing the parent's memory), run one torch thread each and keep running between epochs;
* workers bring nothing while images are cached (the batch only travels through shared memory), and a
  cached store is inherited by every worker copy-on-write, so it is not duplicated.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from villa.storage.errors import VillaError

#: decoded-image memory budget when a caller gives none (MiB); a documented config key, ``image_cache_mb``
DEFAULT_CACHE_MB = 1024


@dataclass(frozen=True)
class ResizePolicy:
    """How an encoder wants its images sized (see the module docstring). ``None`` sides impose nothing."""

    min_side: int | None = None
    max_side: int | None = None

    @classmethod
    def of(cls, encoder) -> ResizePolicy:
        """The policy an :class:`villa.encoders.Encoder` declares."""
        return cls(getattr(encoder, "image_min_side", None), getattr(encoder, "image_max_side", None))

    def output_sizes(self, sizes: np.ndarray) -> np.ndarray:
        """``[N, 2]`` (height, width) stored sizes -> ``[N, 2]`` int64 output sizes."""
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
        scale = np.ones(len(sizes))
        if self.min_side:
            short = sizes.min(1)
            scale = np.where(short < self.min_side, self.min_side / short, scale)
        if self.max_side:
            long = sizes.max(1) * scale
            scale = np.where(long > self.max_side, scale * self.max_side / long, scale)
        return np.maximum(np.rint(sizes * scale[:, None]), 1).astype(np.int64)

    def box_scales(self, sizes: np.ndarray) -> np.ndarray:
        """``[N, 2]`` per-axis factors (sy, sx) mapping stored pixel coordinates to output ones."""
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
        return self.output_sizes(sizes) / sizes


#: the policy that keeps every image at its stored size
NO_RESIZE = ResizePolicy()


def scale_boxes(boxes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Boxes ``[M, 4]`` (x0, y0, x1, y1) times their image's ``scales [M, 2]`` (sy, sx) -> float32 ``[M, 4]``."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    sx, sy = scales[:, 1:2].astype(np.float32), scales[:, 0:1].astype(np.float32)
    return boxes * np.concatenate([sx, sy, sx, sy], axis=1)


_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_rgb(image) -> np.ndarray:
    """A Pillow image of any mode -> uint8 ``[H, W, 3]``."""
    if image.mode in _HIGH_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        array = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        grey = np.rint(array).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def decode_image(
    path: str | os.PathLike,
    policy: ResizePolicy = NO_RESIZE,
    expected_size: Sequence[int] | None = None,
    hint: str = "",
) -> np.ndarray:
    """Read one image as uint8 ``[H', W', 3]``, resized by ``policy``.

    ``expected_size`` (height, width), when given, must equal the stored size. ``hint`` is appended to error
    messages (e.g. the command that rebuilds the dataset).
    """
    from PIL import Image

    path = Path(path)
    suffix = f": {hint}" if hint else ""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if expected_size is not None and (height, width) != tuple(int(v) for v in expected_size):
                raise VillaError(
                    f"image {path} is {width}x{height} but the annotations say "
                    f"{int(expected_size[1])}x{int(expected_size[0])}{suffix}"
                )
            out_h, out_w = (int(v) for v in policy.output_sizes(np.array([[height, width]]))[0])
            if (out_h, out_w) != (height, width) and image.format == "JPEG":
                image.draft("RGB", (out_w, out_h))  # DCT-domain downscale: much faster decoding
            image.load()
            rgb = _to_rgb(image)
        if rgb.shape[:2] != (out_h, out_w):
            rgb = np.asarray(Image.fromarray(rgb).resize((out_w, out_h), Image.BILINEAR))
        return rgb
    except VillaError:
        raise
    except FileNotFoundError:
        raise VillaError(f"image {path} is missing{suffix}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VillaError(f"cannot decode image {path} ({reason}){suffix}") from None


def pad_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 ``[H_i, W_i, 3]`` images -> uint8 ``[B, H_max, W_max, 3]``, zero-padded at the bottom and right."""
    if not images:
        return np.zeros((0, 1, 1, 3), np.uint8)
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    if all(im.shape[:2] == (height, width) for im in images):
        return np.stack(images)
    out = np.zeros((len(images), height, width, 3), np.uint8)
    for i, im in enumerate(images):
        out[i, : im.shape[0], : im.shape[1]] = im
    return out


def size_sorted_batches(
    sizes: np.ndarray, batch_size: int, max_pixels: int | None = None
) -> list[np.ndarray]:
    """Positions of each batch: images sorted by (height, width) and cut into batches of ``batch_size``.

    Same-size images stay together, so a same-size dataset keeps its original order within each size. With
    ``max_pixels``, a batch also ends before its padded area (images x largest height x largest width) would
    exceed ``max_pixels`` (a batch holds at least one image), so the memory of a forward pass does not grow
    with the image size.
    """
    sizes = np.asarray(sizes).reshape(-1, 2)
    order = np.lexsort((np.arange(len(sizes)), sizes[:, 1], sizes[:, 0]))
    # the plain cut when no batch can reach the cap (not even one padded to the largest height and width)
    if (
        not max_pixels
        or len(sizes) == 0
        or batch_size * int(sizes[:, 0].max() * sizes[:, 1].max()) <= max_pixels
    ):
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches, start, height, width = [], 0, 0, 0
    for i, (h, w) in enumerate(sizes[order].tolist()):
        new_h, new_w = max(height, h), max(width, w)
        if i > start and (i - start >= batch_size or (i - start + 1) * new_h * new_w > max_pixels):
            batches.append(order[start:i])
            start, new_h, new_w = i, h, w
        height, width = new_h, new_w
    batches.append(order[start:])
    return batches


def decode_many(
    paths: Sequence[Path],
    policy: ResizePolicy,
    expected_sizes: np.ndarray | None = None,
    hint: str = "",
    threads: int = 2,
) -> list[np.ndarray]:
    """Decode ``paths`` in a small thread pool (Pillow releases the GIL while decoding), order kept."""
    sizes = [None] * len(paths) if expected_sizes is None else list(expected_sizes)
    if threads <= 1 or len(paths) < 4:
        return [decode_image(p, policy, s, hint) for p, s in zip(paths, sizes)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda ps: decode_image(ps[0], policy, ps[1], hint), zip(paths, sizes)))


class ImageStore:
    """The images of one table, served as padded uint8 batches ``[B, 3, H, W]`` at the policy's size.

    Args:
        paths: image files ``[N]``; sizes: stored (height, width) ``[N, 2]`` from the annotations.
        policy: the encoder's :class:`ResizePolicy`.
        cache_mb: decode everything once and keep it when the decoded images fit in this many MiB (0: never);
            otherwise every batch is decoded on request.
        hint: appended to decoding errors (the command that rebuilds the dataset).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        sizes: np.ndarray,
        policy: ResizePolicy = NO_RESIZE,
        cache_mb: float = DEFAULT_CACHE_MB,
        hint: str = "",
        progress: bool = False,
        desc: str = "decode",
    ):
        self.paths = [Path(p) for p in paths]
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        if len(self.paths) != len(self.sizes):
            raise ValueError("paths and sizes differ in length")
        self.policy, self.hint = policy, hint
        self.out_sizes = policy.output_sizes(self.sizes)
        self.scales = policy.box_scales(self.sizes)
        self._uniform = len(self.out_sizes) > 0 and bool((self.out_sizes == self.out_sizes[0]).all())
        self._cache: np.ndarray | list[np.ndarray] | None = None
        decoded_bytes = int((self.out_sizes[:, 0] * self.out_sizes[:, 1]).sum() * 3)
        if cache_mb and decoded_bytes <= cache_mb * 2**20:
            self._cache = self._decode_all(progress, desc)

    @classmethod
    def from_array(cls, images: np.ndarray | torch.Tensor) -> ImageStore:
        """A store over already-decoded same-size images: uint8 ``[N, 3, H, W]`` (tensor) or ``[N, H, W, 3]``."""
        array = images.permute(0, 2, 3, 1).numpy() if torch.is_tensor(images) else np.asarray(images)
        store = cls.__new__(cls)
        store.paths = [Path(f"<array>/{i}") for i in range(len(array))]
        store.sizes = np.tile(np.asarray(array.shape[1:3], dtype=np.int64), (len(array), 1))
        store.policy, store.hint = NO_RESIZE, ""
        store.out_sizes, store.scales = store.sizes.copy(), np.ones((len(array), 2))
        store._uniform, store._cache = True, np.ascontiguousarray(array, dtype=np.uint8)
        return store

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def __len__(self) -> int:
        return len(self.paths)

    def _decode_all(self, progress: bool, desc: str):
        from tqdm.auto import tqdm

        out: list[np.ndarray] = []
        step = 256
        with tqdm(total=len(self.paths), desc=desc, unit="img", leave=False, disable=not progress) as bar:
            for start in range(0, len(self.paths), step):
                stop = min(start + step, len(self.paths))
                out += decode_many(self.paths[start:stop], self.policy, self.sizes[start:stop], self.hint)
                bar.update(stop - start)
        # one contiguous array when every image has one size: a batch is then a single fancy index
        return np.stack(out) if self._uniform else out

    def batch_hwc(self, positions: Sequence[int]) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` of the images at ``positions`` (padded to the batch's largest)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._cache is not None and self._uniform:
            return self._cache[positions]
        if self._cache is not None:
            return pad_batch([self._cache[i] for i in positions.tolist()])
        paths = [self.paths[i] for i in positions.tolist()]
        return pad_batch(decode_many(paths, self.policy, self.sizes[positions], self.hint, threads=1))

    def batch(self, positions: Sequence[int]) -> torch.Tensor:
        """uint8 ``[B, 3, H, W]`` (a channels-first view of :meth:`batch_hwc`)."""
        return torch.from_numpy(self.batch_hwc(positions)).permute(0, 3, 1, 2)
