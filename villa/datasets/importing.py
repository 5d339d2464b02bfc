"""What every importer shares: reading the user's files with one-line errors, checking images, splits,
counting what was skipped, and publishing the dataset folder atomically."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from villa.datasets.contract import SPLITS, write_dataset
from villa.datasets.vocabulary import Vocabulary
from villa.errors import VillaError

#: the seeded split of images when the data names none
DEFAULT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


@dataclass
class SkipLog:
    """Counts what an import left out, with one example each; printed as one line per reason."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, count: int = 1, example: str = "") -> None:
        if count <= 0:
            return
        self.counts[reason] = self.counts.get(reason, 0) + int(count)
        if example and reason not in self.examples:
            self.examples[reason] = example

    def lines(self) -> list[str]:
        out = []
        for reason, count in self.counts.items():
            example = f" (e.g. {self.examples[reason]})" if reason in self.examples else ""
            out.append(f"skipped {count} {reason}{example}")
        return out


# --------------------------------------------------------------------------- reading the user's files
def read_json(path: str | os.PathLike, what: str):
    """Parse a JSON file; a missing file or malformed JSON is one line naming the file and the position."""
    path = Path(path)
    if not path.is_file():
        raise VillaError(f"{what} file {path} not found")
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        reason = err.msg.removesuffix(" starting at")
        raise VillaError(f"{what} file {path} is not valid JSON: {reason} at line {err.lineno}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise VillaError(f"cannot read {what} file {path}: {err}") from None


def require_keys(records: list, keys: Sequence[str], what: str) -> None:
    """Every record is a dict holding ``keys`` (one line naming the first that is not)."""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise VillaError(f"{what} #{i + 1} is not an object")
        missing = [k for k in keys if k not in record]
        if missing:
            raise VillaError(f"{what} #{i + 1} lacks {missing}")


# --------------------------------------------------------------------------- images
def _probe(path: Path) -> tuple[int, int] | str:
    """(height, width) of a fully decodable image, else the reason it is not. JPEGs decode at 1/8 scale:
    that still reads every byte, so truncation is caught, at a fraction of the cost."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
        return int(height), int(width)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def probe_images(
    paths: Sequence[Path], progress: bool = True, threads: int = 4
) -> list[tuple[int, int] | str]:
    """:func:`_probe` every path (a thread pool: Pillow releases the GIL while decoding), with a progress bar."""
    from tqdm.auto import tqdm

    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool,
        tqdm(total=len(paths), desc="checking images", unit="img", disable=not progress) as bar,
    ):
        out = []
        for result in pool.map(_probe, paths, chunksize=64):
            out.append(result)
            bar.update()
    return out


def clip_boxes(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip ``[M, 4]`` x0, y0, x1, y1 boxes to their images; return (clipped, kept) where kept = positive area
    left (a box of zero area, or wholly outside its image, is dropped)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(1)
    boxes = np.nan_to_num(boxes)
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], 0, widths),
            np.clip(boxes[:, 1], 0, heights),
            np.clip(boxes[:, 2], 0, widths),
            np.clip(boxes[:, 3], 0, heights),
        ],
        axis=1,
    )
    kept = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped, kept


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[A, B]`` of x0, y0, x1, y1 boxes ``a [A, 4]`` and ``b [B, 4]``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def grid_boxes(spec: str, height: int, width: int) -> list[list[float]]:
    """The cells of ``grid:RxC`` on an image of ``height x width``, row by row."""
    rows, cols = parse_grid(spec)
    ys = np.linspace(0, height, rows + 1)
    xs = np.linspace(0, width, cols + 1)
    return [
        [float(xs[c]), float(ys[r]), float(xs[c + 1]), float(ys[r + 1])]
        for r in range(rows)
        for c in range(cols)
    ]


def parse_grid(spec: str) -> tuple[int, int]:
    """``"grid:3x3"`` -> (3, 3); anything else is a one-line error."""
    text = str(spec).strip().lower()
    body = text[len("grid:") :] if text.startswith("grid:") else None
    parts = body.split("x") if body else []
    if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) <= 64 for p in parts):
        raise VillaError(f"unknown --regions spec '{spec}': use grid:RxC (e.g. grid:3x3) or boxes")
    return int(parts[0]), int(parts[1])


# --------------------------------------------------------------------------- splits
def seeded_splits(n: int, seed: int, fractions: dict[str, float] = DEFAULT_FRACTIONS) -> list[str]:
    """A seeded random split of ``n`` images by ``fractions`` (train/val/test), as a list of names."""
    order = np.random.default_rng(seed).permutation(n)
    counts = np.floor(np.asarray(list(fractions.values())) * n).astype(int)
    counts[0] += n - counts.sum()  # rounding leftovers go to train
    names = np.repeat(np.asarray(list(fractions)), counts)
    out = np.empty(n, dtype=object)
    out[order] = names
    return out.tolist()


def read_split_file(path: str | os.PathLike) -> dict[str, str]:
    """``--splits=FILE``: image key (id or file name, as text) -> split.

    Accepts a JSON object ``{key: split}``, a JSON object ``{split: [keys]}``, or a CSV with a ``split`` column
    and an ``image``, ``id``, ``image_id`` or ``file_name`` column.
    """
    path = Path(path)
    mapping: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        data = read_json(path, "splits")
        if not isinstance(data, dict):
            raise VillaError(f"splits file {path} must be a JSON object")
        if data and all(k in SPLITS and isinstance(v, list) for k, v in data.items()):
            mapping = {str(key): split for split, keys in data.items() for key in keys}
        else:
            mapping = {str(k): str(v) for k, v in data.items()}
    else:
        import pandas as pd

        if not path.is_file():
            raise VillaError(f"splits file {path} not found")
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as err:
            raise VillaError(
                f"splits file {path} is not a readable CSV: {str(err).splitlines()[0]}"
            ) from None
        key = next((c for c in ("image", "id", "image_id", "file_name") if c in frame.columns), None)
        if key is None or "split" not in frame.columns:
            raise VillaError(f"splits file {path} needs a 'split' column and an 'image' or 'id' column")
        mapping = dict(zip(frame[key].str.strip(), frame["split"].str.strip()))
    bad = sorted({v for v in mapping.values() if v not in SPLITS})
    if bad:
        raise VillaError(f"splits file {path} names unknown splits {bad[:3]}: use train, val and test")
    return mapping


def assign_splits(
    keys: Sequence[tuple[str, ...]],
    given: Sequence[str | None] | None,
    split_file: str | os.PathLike | None,
    seed: int,
    log: SkipLog,
) -> list[str | None]:
    """Each image's split: from its own ``split`` value, else ``--splits=FILE`` (looked up by any of the
    image's ``keys``: id, file name), else a seeded 70/15/15 split. Images a split file leaves out are
    skipped (None)."""
    n = len(keys)
    if given is not None and any(g for g in given):
        bad = sorted({g for g in given if g not in SPLITS})
        if bad:
            raise VillaError(f"unknown split values {bad[:3]} in the split column: use train, val and test")
        return list(given)
    if split_file is not None:
        mapping = read_split_file(split_file)
        out = [next((mapping[k] for k in key if k in mapping), None) for key in keys]
        missing = [key[0] for key, s in zip(keys, out) if s is None]
        log.add("images that the splits file does not list", len(missing), missing[0] if missing else "")
        return out
    return seeded_splits(n, seed)


# --------------------------------------------------------------------------- vocabulary against the texts
def check_vocabulary_matches(vocabulary: Vocabulary, texts: Sequence[str]) -> list[str]:
    """Refuse a vocabulary that no text mentions; return one warning line for attributes never mentioned."""
    present = vocabulary.match_matrix(texts).any(0)
    if not present.any():
        raise VillaError(
            f"no text mentions any of the {len(vocabulary)} attributes (e.g. {vocabulary.names[0]!r}): "
            "check the vocabulary's names and 'match' phrases"
        )
    never = [n for n, p in zip(vocabulary.names, present) if not p]
    if never:
        shown = ", ".join(never[:8]) + (", ..." if len(never) > 8 else "")
        return [f"warning: {len(never)} attributes are never mentioned in any text: {shown}"]
    return []


def check_sentences(texts: Sequence[str], where: Callable[[int], str]) -> None:
    """Refuse a non-empty text of which :func:`villa.text.split_sentences` keeps no sentence (every piece
    three characters or fewer): the stages could not use it. One line, naming the row with ``where(i)``."""
    from villa.text import MIN_SENTENCE_CHARS, split_sentences

    for i, text in enumerate(texts):
        if text and not split_sentences(text):
            raise VillaError(
                f"{where(i)}: the text {text!r} has no sentence longer than {MIN_SENTENCE_CHARS} characters "
                "(sentences end at '.', '!', '?' and ';'): write a longer text or leave the image out"
            )


# --------------------------------------------------------------------------- publishing
@dataclass
class ImportResult:
    dataset_dir: Path
    num_images: dict[str, int]
    num_regions: int
    lines: list[str]


def publish(
    out: str | os.PathLike,
    columns: dict[str, list],
    vocabulary: Vocabulary,
    *,
    source: str,
    image_dir: Path,
    copy_images: bool,
    overwrite: bool,
    info: dict,
    progress: bool = True,
) -> Path:
    """Write the dataset into a temporary folder and rename it to ``out`` only when complete.

    Images are referenced where they are (``image_root`` = the absolute image folder) unless ``copy_images``,
    which copies them into ``out/images`` (hard links when on the same file system).
    """
    from tqdm.auto import tqdm

    from villa.io import atomic_dir

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise VillaError(f"{out} already exists: pass --overwrite to replace it")
    image_dir = Path(image_dir).expanduser().resolve()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        image_root: str = str(image_dir)
        if copy_images:
            image_root = "images"
            copied = []
            for rel in tqdm(
                columns["image_filepath"], desc="copying images", unit="img", disable=not progress
            ):
                source_path = image_dir / rel
                # an absolute path keeps its folders below the root: /data/x/1.png -> images/data/x/1.png
                rel = str(Path(rel).relative_to(Path(rel).anchor)) if Path(rel).is_absolute() else rel
                copied.append(rel)
                target = tmp / "images" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source_path, target)
                except OSError:
                    shutil.copy2(source_path, target)
            columns = {**columns, "image_filepath": copied}
        write_dataset(tmp, columns, vocabulary, source=source, image_root=image_root, info=info)
    return out.resolve()


def summary_lines(columns: dict[str, list], vocabulary: Vocabulary, region_labels: bool) -> list[str]:
    counts = {s: 0 for s in SPLITS}
    for split in columns["split"]:
        counts[split] += 1
    per_split = ", ".join(f"{s} {c}" for s, c in counts.items() if c)
    regions = sum(columns["num_regions"])
    return [
        f"imported {len(columns['image_id'])} images ({per_split}), {regions} regions, "
        f"{len(vocabulary)} attributes, region labels: {'yes' if region_labels else 'no'}"
    ]


def run_import(build: Callable[[], ImportResult]) -> ImportResult:
    """Run an importer and print its summary lines and the dataset folder (the last line)."""
    result = build()
    for line in result.lines:
        print(line)
    print(result.dataset_dir)
    return result
