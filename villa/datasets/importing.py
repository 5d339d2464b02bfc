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
from villa.regions import RegionSpec
from villa.storage.errors import VillaError

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


def computed_regions(
    spec: RegionSpec,
    paths: Sequence[Path],
    heights: Sequence[float],
    widths: Sequence[float],
    progress: bool = True,
) -> list[list[list[float]]]:
    """The regions a ``grid:RxC`` or ``proposals[:K]`` spec gives each image (``[x0, y0, x1, y1]`` lists); an
    image too small to hold any proposal is a one-line error naming it (:meth:`RegionSpec.for_files`)."""
    sizes = np.stack([np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)], axis=1)
    found = spec.for_files(paths, sizes, strict=True, progress=progress)
    return [boxes.astype(np.float64).tolist() for boxes, _ in found]


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
    """Refuse a vocabulary that no text mentions; return the lines to print: how many mentions are negated and
    uncertain under the vocabulary's policy (:meth:`Vocabulary.assertion_summary`) and a warning line for
    attributes never mentioned."""
    status = vocabulary.status_matrix(texts)  # [N, K]
    present = (status & vocabulary.kept_statuses).any(0)
    if not present.any():
        dropped = " (every mention is negated or uncertain, which the policy drops)" if status.any() else ""
        raise VillaError(
            f"no text mentions any of the {len(vocabulary)} attributes (e.g. {vocabulary.names[0]!r}){dropped}: "
            "check the vocabulary's names and 'match' phrases"
        )
    lines = [vocabulary.assertion_summary(texts)]
    never = [n for n, p in zip(vocabulary.names, present) if not p]
    if never:
        shown = ", ".join(never[:8]) + (", ..." if len(never) > 8 else "")
        only = " (or only in mentions the policy drops)" if status.any(0)[~present].any() else ""
        lines.append(f"warning: {len(never)} attributes are never mentioned in any text{only}: {shown}")
    return lines


def check_sentences(texts: Sequence[str], where: Callable[[int], str]) -> None:
    """Refuse a non-empty text of which :func:`villa.datasets.text.split_sentences` keeps no sentence (every piece
    three characters or fewer): the stages could not use it. One line, naming the row with ``where(i)``."""
    from villa.datasets.text import MIN_SENTENCE_CHARS, split_sentences

    for i, text in enumerate(texts):
        if text and not split_sentences(text):
            raise VillaError(
                f"{where(i)}: the text {text!r} has no sentence longer than {MIN_SENTENCE_CHARS} characters "
                "(sentences end at '.', '!', '?' and ';'): write a longer text or leave the image out"
            )


# --------------------------------------------------------------------------- publishing
def check_output(
    out: str | os.PathLike, overwrite: bool, inputs: dict[str, str | os.PathLike | None]
) -> Path:
    """Refuse, before any work, an ``--out`` that would lose files villa did not write (one line each): one
    equal to or containing an input (``{"--images folder": path, ...}``), an existing one without
    ``--overwrite``, or, with it, one that is not a villa dataset folder (no ``dataset.json``). Returns
    ``out``, user-expanded."""
    from villa.datasets.contract import INFO_FILE, is_dataset_folder
    from villa.storage.io import check_output_dir

    return check_output_dir(
        out, overwrite=overwrite, is_own=is_dataset_folder, own_marker=f"{INFO_FILE} of a villa dataset",
        inputs=inputs,
    )  # fmt: skip


def copy_targets(filepaths: Sequence[str], image_dir: str | os.PathLike) -> list[str]:
    """Where ``--copy_images`` puts each image, relative to ``<out>/images``: the path as given, normalised; a
    path that climbs out of the image folder (``../x.jpg``) or is absolute keeps its absolute location below
    the root instead (``/data/x/1.png`` -> ``data/x/1.png``; ``../x.jpg`` of ``/data/img`` -> ``data/x.jpg``), so
    every copy stays inside the dataset folder.
    Two different images that would land on one file are refused (one line naming both)."""
    targets: list[str] = []
    owner: dict[str, str] = {}
    for given in filepaths:
        rel = os.path.normpath(given)
        if os.path.isabs(rel) or rel == os.pardir or rel.startswith(os.pardir + os.sep):
            where = os.path.normpath(os.path.join(os.path.abspath(image_dir), given))
            rel = os.path.relpath(where, Path(where).anchor)
        if rel in ("", os.curdir):
            raise VillaError(f"--copy_images: the image path {given!r} names no file")
        first = owner.setdefault(rel, given)
        if first != given and os.path.normpath(first) != os.path.normpath(given):
            raise VillaError(
                f"--copy_images: the images {first!r} and {given!r} would both be copied to images/{rel}: "
                "rename one of them or import without --copy_images"
            )
        targets.append(rel)
    return targets


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
    which copies them into ``out/images`` (hard links when on the same file system; see :func:`copy_targets`).
    ``out`` is checked as :func:`check_output` does, and must hold none of the images it reads.
    """
    from tqdm.auto import tqdm

    from villa.storage.io import atomic_dir

    image_dir = Path(image_dir).expanduser().resolve()
    out = check_output(out, overwrite, {"--images folder": image_dir})
    resolved = out.resolve()
    sources = [os.path.normpath(image_dir / rel) for rel in columns["image_filepath"]]
    inside = next((p for p in sources if Path(p).is_relative_to(resolved)), None)
    if inside is not None:  # (found lexically: a referenced image would go with the old folder)
        raise VillaError(
            f"the output folder {out} holds the image {inside} that this import reads: "
            "choose an output folder that holds none of your images"
        )
    targets = copy_targets(columns["image_filepath"], image_dir) if copy_images else []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        image_root: str = str(image_dir)
        if copy_images:
            image_root = "images"
            done: set[str] = set()
            for source_path, rel in tqdm(
                zip(sources, targets), total=len(targets), desc="copying images", unit="img",
                disable=not progress,
            ):  # fmt: skip
                if rel in done:  # one file named twice (e.g. a/../b.jpg and b.jpg): copied once
                    continue
                done.add(rel)
                target = tmp / "images" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source_path, target)
                except OSError:
                    shutil.copy2(source_path, target)
            columns = {**columns, "image_filepath": targets}
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
    """Run an importer and print its summary lines, the next command (with the encoder to choose for
    photographs) and the dataset folder (the last line)."""
    result = build()
    for line in result.lines:
        print(line)
    print(
        f"next: python3 preprocess/preprocess_dataset.py --data_dir={result.dataset_dir} --encoder=mobilenet_v2 "
        "(an ImageNet-pretrained image tower; --encoder=default is untrained: docs/datasets.md#choosing-an-encoder)"
    )
    print(result.dataset_dir)
    return result
