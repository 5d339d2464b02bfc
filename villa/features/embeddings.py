"""Schema of precomputed embeddings: the one reader and writer of ``attr_embs.pth``,
``region_embs/`` and ``text_embs/`` inside a dataset folder.

Layout::

    attr_embs.pth                   dict attribute -> float32 tensor [D], vocabulary order, L2-normalised
    region_embs/manifest.json       {"format", "encoder", "dim", "dataset", "num_images", "num_regions",
                                     "shards": [{"file", "rows"}], "files", ...}
    region_embs/shard_*.npy         float32 [rows, D] (plain .npy: memory-mappable, no pickle)
    region_embs/region_emb_mapping.feather   image_id, start (global row), num_regions
    text_embs/manifest.json         {"format", "encoder", "dim", "num_texts", "files"}
    text_embs/texts.feather         text (one row per distinct sentence)
    text_embs/embs.npy              float32 [n, D], L2-normalised
    region_embs.partial/            only while preprocessing runs or after it was killed: its completed
                                    shards, from which the next run resumes (see RegionWork)

Regions of an image are consecutive rows in the order of its ``region_coord``. Shards are
concatenated in manifest order to form the global row index. ``files`` maps every other file of the
folder to ``{"bytes", "rows", "sha256"}``.

Validation on read (a damaged file is one :class:`~villa.storage.errors.VillaError` line naming the file, the
problem and the preprocessing command that rebuilds it; see :mod:`villa.storage.artifacts`):

* always, and cheap: the manifest parses and has its keys; every file exists with the byte size the
  manifest records; every ``.npy`` header is read with ``numpy.lib.format`` and its dtype, shape and the
  file size it implies are compared with the manifest BEFORE the data is memory-mapped; feather files read
  completely (Arrow checks their structure); row counts agree (mapping rows = images, the mapping's regions
  = shard rows, texts = embedding rows); no image_id and no sentence appears twice.
* sha256 of every file: when the folder's files total at most :data:`CHECKSUM_LIMIT` (256 MiB, about
  0.2-0.5 s of hashing; DocMNIST 30000 is ~40 MB), else only on demand: ``open(..., verify=True)`` or
  ``VILLA_VERIFY_CHECKSUMS=1`` (``0`` never verifies). A file verified once is not hashed again by the same
  process while its size and mtime are unchanged.
* Manifests written before sizes and checksums were recorded (``format`` 1) are accepted: they get every
  check above except the recorded byte sizes and the checksums (sizes are derived from the ``.npy``
  headers), so existing datasets need no re-preprocessing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from villa.storage.artifacts import (
    check_file,
    damaged,
    file_record,
    load_torch,
    npy_header,
    one_line,
    open_npy,
    read_feather_table,
    read_json,
    rerun_preprocessing,
    save_npy,
    verify_sha256,
)
from villa.storage.artifacts import file_sha256 as file_sha256
from villa.storage.errors import VillaError
from villa.storage.io import atomic_dir, atomic_path, check_own_folder, save_torch, write_json

#: 2 adds ``files`` (bytes, rows, sha256 of every file) and ``num_texts``; 1 is still read
FORMAT_VERSION = 2
ATTR_EMBS_FILE = "attr_embs.pth"
REGION_EMBS_DIR = "region_embs"
#: a preprocessing run's completed shards until region_embs/ is published (see RegionWork)
REGION_WORK_DIR = "region_embs.partial"
TEXT_EMBS_DIR = "text_embs"
MANIFEST_FILE = "manifest.json"
MAPPING_FILE = "region_emb_mapping.feather"
TEXTS_FILE = "texts.feather"
TEXT_EMBS_FILE = "embs.npy"
#: sha256 of every file is verified by default when a folder's files total at most this many bytes
CHECKSUM_LIMIT = 256 << 20
VERIFY_ENV = "VILLA_VERIFY_CHECKSUMS"


# --------------------------------------------------------------------------- attribute embeddings
def save_attr_embs(dataset_dir: str | os.PathLike, embeddings: dict[str, torch.Tensor]) -> Path:
    """Write ``attr_embs.pth``: attribute -> 1-D float32 tensor, in the given (vocabulary) order."""
    clean = {
        name: vec.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        for name, vec in embeddings.items()
    }
    path = Path(dataset_dir) / ATTR_EMBS_FILE
    save_torch(path, clean)
    return path


def load_attr_embs(
    dataset_dir: str | os.PathLike, vocabulary: Sequence[str] | None = None
) -> tuple[list[str], torch.Tensor]:
    """Read ``attr_embs.pth`` as (attribute names, tensor ``[K, D]``), ordered like ``vocabulary`` if given."""
    path = Path(dataset_dir) / ATTR_EMBS_FILE
    fix = rerun_preprocessing(dataset_dir)
    if not path.is_file():
        raise VillaError(f"no {ATTR_EMBS_FILE} in {dataset_dir}: run {fix[len('re-run ') :]} first")
    embs = load_torch(path, dataset_dir, fix)
    if not isinstance(embs, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) and v.ndim == 1 and v.is_floating_point()
        for k, v in embs.items()
    ):
        raise damaged(path, dataset_dir, "is not a dict of attribute -> 1-D float tensor", fix)
    if len({v.numel() for v in embs.values()}) > 1:
        raise damaged(path, dataset_dir, "holds embeddings of different sizes", fix)
    names = list(vocabulary) if vocabulary is not None else list(embs)
    missing = [n for n in names if n not in embs]
    if missing:
        raise damaged(path, dataset_dir, f"has no embedding for attributes {missing}", fix)
    if not names:
        raise damaged(path, dataset_dir, "holds no attributes", fix)
    return names, torch.stack([embs[n].float() for n in names])


# --------------------------------------------------------------------------- manifests
def read_manifest(folder: str | os.PathLike) -> dict:
    """Read ``<folder>/manifest.json`` (``region_embs/`` or ``text_embs/``) and check its common keys."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    fix = rerun_preprocessing(folder.parent)
    if not path.is_file():
        raise VillaError(
            f"no embeddings in {folder} ({MANIFEST_FILE} missing): run {fix[len('re-run ') :]} first"
        )
    manifest = read_json(path, root=folder.parent, fix=fix, required=("format", "encoder", "dim"))
    fix = rerun_preprocessing(folder.parent, manifest)
    version = manifest["format"]
    if not isinstance(version, int) or version < 1:
        raise damaged(path, folder.parent, f"has an invalid format {version!r}", fix)
    if version > FORMAT_VERSION:
        raise damaged(
            path,
            folder.parent,
            f"has format {version}, newer than this villa reads ({FORMAT_VERSION})",
            "update villa or " + fix,
        )
    if not isinstance(manifest["dim"], int) or manifest["dim"] < 1:
        raise damaged(path, folder.parent, f"has an invalid dim {manifest['dim']!r}", fix)
    if not isinstance(manifest["encoder"], str):
        raise damaged(path, folder.parent, f"has an invalid encoder {manifest['encoder']!r}", fix)
    return manifest


def _file_records(folder: Path, manifest: dict, names: Sequence[str], fix: str) -> dict[str, dict]:
    """The manifest's ``files`` records of ``names`` (empty for format-1 manifests, which have none)."""
    if manifest["format"] < 2:
        return {}
    path = folder / MANIFEST_FILE
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise damaged(path, folder.parent, "lacks keys ['files']", fix)
    records = {}
    for name in names:
        record = files.get(name)
        if not (
            isinstance(record, dict)
            and isinstance(record.get("bytes"), int)
            and isinstance(record.get("rows"), int)
            and isinstance(record.get("sha256"), str)
        ):
            raise damaged(path, folder.parent, f"has no valid bytes/rows/sha256 record of {name}", fix)
        records[name] = record
    return records


def _verify_policy(total_bytes: int, verify: bool | None) -> bool:
    """Whether to hash the files: ``verify`` if given, else ``$VILLA_VERIFY_CHECKSUMS``, else by size."""
    if verify is not None:
        return bool(verify)
    env = os.environ.get(VERIFY_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "always"):
        return True
    if env in ("0", "false", "no", "never"):
        return False
    if env not in ("", "auto"):
        raise VillaError(f"{VERIFY_ENV} must be 1, 0 or auto, got '{env}'")
    return total_bytes <= CHECKSUM_LIMIT


def _check_files(folder: Path, records: dict[str, dict], fix: str, verify: bool | None) -> None:
    """Sizes of every recorded file first (a truncated file says so), then checksums by policy."""
    for name, record in records.items():
        check_file(folder / name, folder.parent, fix, record)
    if records and _verify_policy(sum(r["bytes"] for r in records.values()), verify):
        for name, record in records.items():
            verify_sha256(folder / name, folder.parent, record["sha256"], fix)


def check_encoder(manifest: dict, expected_encoder: str | None, where: str | os.PathLike) -> None:
    """Refuse embeddings computed with another encoder than ``expected_encoder`` (None accepts any)."""
    if expected_encoder is not None and manifest.get("encoder") != expected_encoder:
        raise VillaError(
            f"embeddings in {where} were computed with encoder '{manifest.get('encoder')}' "
            f"(dim {manifest.get('dim')}), but this run uses encoder '{expected_encoder}': "
            f"re-run preprocessing with --encoder={expected_encoder}"
        )


def check_fresh(manifest: dict, dataset_dir: str | os.PathLike, where: str | os.PathLike) -> None:
    """Refuse embeddings computed from another version of the dataset's annotation table."""
    from villa.datasets.contract import annotations_path

    recorded = manifest.get("annotations_sha256")
    current = annotations_path(dataset_dir)
    if recorded and current.is_file() and file_sha256(current) != recorded:
        raise VillaError(
            f"embeddings in {where} were computed from an older annotations.feather: "
            f"{rerun_preprocessing(dataset_dir, manifest)}"
        )


# --------------------------------------------------------------------------- region embeddings
class RegionEmbeddingWriter:
    """Write ``region_embs/`` shard by shard into a temporary folder; publish it atomically on close.

    Usage::

        with RegionEmbeddingWriter(dataset_dir, encoder="default", dim=384) as writer:
            writer.add(image_ids, num_regions, embeddings)   # embeddings [sum(num_regions), D]
    """

    def __init__(self, dataset_dir: str | os.PathLike, encoder: str, dim: int, extra: dict | None = None):
        self.dataset_dir = Path(dataset_dir)
        self.encoder, self.dim, self.extra = encoder, int(dim), dict(extra or {})
        self._image_ids: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._shards: list[dict] = []
        self._files: dict[str, dict] = {}
        self._rows = 0
        self._ctx = None
        self._tmp: Path | None = None

    def __enter__(self) -> RegionEmbeddingWriter:
        self._ctx = atomic_dir(self.dataset_dir / REGION_EMBS_DIR, overwrite=True, own_marker=MANIFEST_FILE)
        self._tmp = self._ctx.__enter__()
        return self

    def add(self, image_ids: Sequence[int], num_regions: Sequence[int], embeddings) -> None:
        """Append one shard: ``embeddings`` is ``[sum(num_regions), D]`` for ``image_ids`` in order."""
        array = embeddings.detach().cpu().float().numpy() if torch.is_tensor(embeddings) else embeddings
        array = np.ascontiguousarray(array, dtype=np.float32)
        counts = np.asarray(num_regions, dtype=np.int64)
        if array.ndim != 2 or array.shape[1] != self.dim or array.shape[0] != counts.sum():
            raise ValueError(
                f"shard of shape {array.shape} does not match {counts.sum()} regions x dim {self.dim}"
            )
        name = f"shard_{len(self._shards):05d}.npy"
        self._files[name] = save_npy(self._tmp / name, array)
        self._shards.append({"file": name, "rows": int(array.shape[0])})
        self._image_ids.append(np.asarray(image_ids, dtype=np.int64))
        self._counts.append(counts)
        self._rows += int(array.shape[0])

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return self._ctx.__exit__(exc_type, exc, tb)
        try:
            self._finish()
        except BaseException as err:
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        return self._ctx.__exit__(None, None, None)

    def _finish(self) -> None:
        image_ids = np.concatenate(self._image_ids) if self._image_ids else np.zeros(0, np.int64)
        counts = np.concatenate(self._counts) if self._counts else np.zeros(0, np.int64)
        if len(np.unique(image_ids)) != len(image_ids):
            raise ValueError("an image_id was written twice")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        pd.DataFrame({"image_id": image_ids, "start": starts, "num_regions": counts}).to_feather(
            self._tmp / MAPPING_FILE
        )
        self._files[MAPPING_FILE] = file_record(self._tmp / MAPPING_FILE, len(image_ids))
        manifest = {
            "format": FORMAT_VERSION,
            "encoder": self.encoder,
            "dim": self.dim,
            "dataset": self.dataset_dir.name,
            "num_images": int(len(image_ids)),
            "num_regions": int(self._rows),
            "shards": self._shards,
            "files": self._files,
            **self.extra,
        }
        (self._tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def write_region_embeddings(
    dataset_dir: str | os.PathLike,
    image_ids: Sequence[int],
    num_regions: Sequence[int],
    embeddings,
    encoder: str,
    extra: dict | None = None,
) -> Path:
    """Write all region embeddings ``[sum(num_regions), D]`` in one shard."""
    dim = int(embeddings.shape[1])
    with RegionEmbeddingWriter(dataset_dir, encoder=encoder, dim=dim, extra=extra) as writer:
        writer.add(image_ids, num_regions, embeddings)
    return Path(dataset_dir) / REGION_EMBS_DIR


# --------------------------------------------------------------------------- preprocessing work in progress
class RegionWork:
    """``region_embs.partial/``: the completed shards of a preprocessing run, kept so a killed run resumes.

    Layout::

        region_embs.partial/progress.json        {"format", "key", "shards": [{"name", "images", "rows",
                                                  "stats_count", "files": {file: {"bytes", "rows", "sha256"}}}]}
        region_embs.partial/<name>.npy           float32 [rows, D]: the model's output rows of the shard's images
        region_embs.partial/<name>_ids.npy       int64 [images, 2]: image_id, num_regions (row order)
        region_embs.partial/<name>_stats.npy     float64 [2, D]: mean and m2 of the shard's statistics rows
                                                 (rich features only; see villa.encoders.rich.RunningMoments)

    A shard's files are written (each atomically) before ``progress.json`` lists it, so a listed shard is
    complete; files it does not list are leftovers of a killed write and are deleted on open. ``key`` is what
    the rows depend on (encoder, its config, region features, the annotations' sha256, ...): work with another
    key is discarded on open (one printed line). Only rank 0 of a torchrun job touches the folder.
    """

    FILE = "progress.json"
    FORMAT = 1

    def __init__(self, folder: Path, key: dict, shards: list[dict]):
        self.folder, self.key, self._shards = folder, key, shards

    @classmethod
    def open(cls, dataset_dir: str | os.PathLike, key: dict, log=print) -> RegionWork:
        """The work folder of ``dataset_dir`` for ``key``: its completed shards, or a fresh empty folder."""
        import shutil

        folder = Path(dataset_dir) / REGION_WORK_DIR
        key = json.loads(json.dumps(key))  # the form it takes in progress.json
        shards: list[dict] = []
        # the folders this run will replace or delete, checked before any work: villa's own only (a work
        # folder gets its progress record right after it is made, so only an empty one may lack it)
        if not (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())):
            check_own_folder(folder, cls.FILE, "a preprocessing work folder")
        for published in (REGION_EMBS_DIR, TEXT_EMBS_DIR):
            check_own_folder(Path(dataset_dir) / published, MANIFEST_FILE, "an embeddings folder")
        if folder.exists():
            problem, shards = cls._check(folder, key)
            if problem:
                log(f"discarding the partial preprocessing in {folder}: {problem}")
                shutil.rmtree(folder)
                shards = []
            elif shards:
                images = sum(s["images"] for s in shards)
                log(f"resuming the preprocessing in {folder}: {len(shards)} shards ({images:,} images) done")
        folder.mkdir(parents=True, exist_ok=True)
        work = cls(folder, key, shards)
        keep = {cls.FILE, *(name for s in shards for name in s["files"])}
        for leftover in folder.iterdir():
            if leftover.name in keep:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        work._write_progress()
        return work

    @classmethod
    def _check(cls, folder: Path, key: dict) -> tuple[str | None, list[dict]]:
        """(why the work cannot be reused or None, its shards)."""
        try:
            progress = json.loads((folder / cls.FILE).read_text())
            if not isinstance(progress, dict) or progress.get("format") != cls.FORMAT:
                return "it was written by another villa version", []
            if progress.get("key") != key:
                stored = progress.get("key") if isinstance(progress.get("key"), dict) else {}
                changed = sorted(k for k in {*stored, *key} if stored.get(k) != key.get(k))
                return f"its {', '.join(changed)} differ from this run's", []
            shards = progress["shards"]
            for shard in shards:
                for name, record in shard["files"].items():
                    if not isinstance(record.get("bytes"), int):
                        return "its progress record is missing or damaged", []
                    try:  # (a damaged shard is recomputed, so the reason is returned, not raised)
                        check_file(folder / name, folder, "", record)
                        rows = npy_header(folder / name, folder, "")[0][0]
                    except (VillaError, IndexError):
                        return f"{name} is damaged", []
                    if rows != record["rows"]:
                        return f"{name} is damaged", []
            return None, shards
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "its progress record is missing or damaged", []

    def _write_progress(self) -> None:
        write_json(self.folder / self.FILE, {"format": self.FORMAT, "key": self.key, "shards": self._shards})

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def covered_ids(self) -> np.ndarray:
        """int64 image ids of every completed shard."""
        ids = [np.load(self.folder / f"{s['name']}_ids.npy")[:, 0] for s in self._shards]
        return np.concatenate(ids) if ids else np.zeros(0, np.int64)

    def add(
        self, image_ids, num_regions, rows: np.ndarray, moments: tuple[int, np.ndarray] | None = None
    ) -> None:
        """Record one completed shard: ``rows`` ``[sum(num_regions), D]`` float32 of ``image_ids`` in order;
        ``moments`` = (count, float64 ``[2, D]`` mean and m2) of its statistics rows, if any."""
        name = f"part_{len(self._shards):05d}"
        ids = np.stack([np.asarray(image_ids, np.int64), np.asarray(num_regions, np.int64)], axis=1)
        arrays = {f"{name}.npy": np.ascontiguousarray(rows, np.float32), f"{name}_ids.npy": ids}
        if moments is not None:
            arrays[f"{name}_stats.npy"] = np.asarray(moments[1], np.float64)
        files = {}
        for file, array in arrays.items():
            with atomic_path(self.folder / file) as tmp:
                files[file] = save_npy(tmp, array)
        self._shards.append(
            {
                "name": name,
                "images": len(ids),
                "rows": int(len(rows)),
                "stats_count": None if moments is None else int(moments[0]),
                "files": files,
            }
        )
        self._write_progress()  # the shard counts as done only from here on

    def shards(self):
        """Yield ``(image_ids [n], num_regions [n], rows [m, D] memory-mapped, moments or None)`` in order."""
        for shard in self._shards:
            ids = np.load(self.folder / f"{shard['name']}_ids.npy")
            rows = np.load(self.folder / f"{shard['name']}.npy", mmap_mode="r")
            moments = None
            if shard["stats_count"] is not None:
                moments = (shard["stats_count"], np.load(self.folder / f"{shard['name']}_stats.npy"))
            yield ids[:, 0], ids[:, 1], rows, moments

    def remove(self) -> None:
        """Delete the folder (after its results are published)."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


class RegionEmbeddings:
    """Read-only view of ``region_embs/`` (shards are memory-mapped)."""

    def __init__(self, folder: Path, manifest: dict, mapping: pd.DataFrame, shards: list[np.ndarray]):
        self.folder, self.manifest, self.mapping = folder, manifest, mapping
        self._shards = shards
        self._shard_starts = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
        self._row_of = pd.Series(np.arange(len(mapping)), index=mapping["image_id"].to_numpy())

    @property
    def encoder(self) -> str:
        return self.manifest["encoder"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @classmethod
    def open(
        cls,
        dataset_dir: str | os.PathLike,
        expected_encoder: str | None = None,
        *,
        verify: bool | None = None,
    ) -> RegionEmbeddings:
        """Open and validate ``region_embs/`` (see the module docstring); shards are memory-mapped.

        ``verify``: hash every file against the manifest (True), never (False), or by size (None).
        """
        folder = Path(dataset_dir) / REGION_EMBS_DIR
        manifest = read_manifest(folder)
        check_encoder(manifest, expected_encoder, folder)
        check_fresh(manifest, dataset_dir, folder)
        fix = rerun_preprocessing(dataset_dir, manifest)
        root, manifest_path = Path(dataset_dir), folder / MANIFEST_FILE

        def bad_manifest(problem: str) -> VillaError:
            return damaged(manifest_path, root, problem, fix)

        missing = [k for k in ("num_images", "num_regions", "shards") if k not in manifest]
        if missing:
            raise bad_manifest(f"lacks keys {missing}")
        shards_meta = manifest["shards"]
        if not isinstance(shards_meta, list) or not all(
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and isinstance(s.get("rows"), int)
            and Path(s["file"]).name == s["file"]
            for s in shards_meta
        ):
            raise bad_manifest("has an invalid shard list")
        num_images, num_regions = manifest["num_images"], manifest["num_regions"]
        if not (isinstance(num_images, int) and isinstance(num_regions, int)):
            raise bad_manifest("has invalid num_images/num_regions")
        if sum(s["rows"] for s in shards_meta) != num_regions:
            raise bad_manifest(f"lists shards whose rows do not add up to num_regions={num_regions}")
        records = _file_records(folder, manifest, [*(s["file"] for s in shards_meta), MAPPING_FILE], fix)
        _check_files(folder, records, fix, verify)

        mapping_path = folder / MAPPING_FILE
        table = read_feather_table(
            mapping_path, root, fix, columns=("image_id", "start", "num_regions"), rows=num_images
        )
        if any(table.column(c).null_count for c in ("image_id", "start", "num_regions")):
            raise damaged(mapping_path, root, "has empty (null) entries", fix)
        try:
            mapping = pd.DataFrame(
                {c: table.column(c).to_numpy().astype(np.int64) for c in ("image_id", "start", "num_regions")}
            )
        except Exception as err:  # nulls or non-integer columns
            raise damaged(mapping_path, root, f"has invalid columns ({one_line(err)})", fix) from None
        counts = mapping["num_regions"].to_numpy()
        if (counts < 0).any() or counts.sum() != num_regions:
            raise damaged(
                mapping_path, root, f"maps {counts.sum():,} regions, but the shards hold {num_regions:,}", fix
            )
        if not np.array_equal(mapping["start"].to_numpy(), np.cumsum(counts) - counts):
            raise damaged(mapping_path, root, "has start rows that do not follow the region counts", fix)
        if not mapping["image_id"].is_unique:
            duplicated = mapping["image_id"][mapping["image_id"].duplicated()].iloc[0]
            raise damaged(mapping_path, root, f"lists image_id {duplicated} twice", fix)
        shards = [
            open_npy(
                folder / s["file"],
                root,
                fix,
                shape=(s["rows"], manifest["dim"]),
                record=records.get(s["file"]),
            )
            for s in shards_meta
        ]
        return cls(folder, manifest, mapping, shards)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._row_of.index

    def check_covers(self, image_ids: Iterable[int], num_regions: Iterable[int] | None = None) -> None:
        """Raise :class:`VillaError` unless every image has embeddings (with the expected region count)."""
        ids = np.asarray(list(image_ids), dtype=np.int64)
        present = np.isin(ids, self.mapping["image_id"].to_numpy())
        if not present.all():
            raise VillaError(
                f"{(~present).sum()} images have no region embeddings in {self.folder} "
                f"(e.g. image_id {ids[~present][0]}): {rerun_preprocessing(self.folder.parent, self.manifest)}"
            )
        if num_regions is not None:
            stored = self.mapping["num_regions"].to_numpy()[self._row_of.loc[ids].to_numpy()]
            if not np.array_equal(stored, np.asarray(list(num_regions))):
                raise VillaError(
                    f"region counts in {self.folder} do not match the annotations: "
                    f"{rerun_preprocessing(self.folder.parent, self.manifest)}"
                )

    def rows(self, image_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices (flat) of the regions of ``image_ids`` and the per-image counts."""
        positions = self._row_of.loc[np.asarray(image_ids, dtype=np.int64)].to_numpy()
        starts = self.mapping["start"].to_numpy()[positions]
        counts = self.mapping["num_regions"].to_numpy()[positions]
        flat = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(
            counts.sum()
        )
        return flat, counts

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings ``[len(rows), D]`` of global ``rows``."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self._shard_starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self._shards[s][rows[sel] - self._shard_starts[s]]
        return out

    def gather_packed(self, image_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The real regions of ``image_ids``, image by image: embeddings ``[M, D]`` float32 and the
        per-image region counts ``[N]`` long (memory follows M, not N times the largest count)."""
        rows, counts = self.rows(image_ids)
        return torch.from_numpy(self.take(rows)), torch.from_numpy(counts.astype(np.int64))

    def gather(self, image_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded embeddings ``[N, R_max, D]`` and region mask ``[N, R_max]`` (True = real region)."""
        flat, counts = self.gather_packed(image_ids)
        r_max = int(counts.max()) if len(counts) else 0
        mask = torch.arange(r_max)[None, :] < counts[:, None]
        padded = torch.zeros(len(counts), r_max, self.dim)
        padded[mask] = flat
        return padded, mask


# --------------------------------------------------------------------------- sentence embedding cache
class TextEmbeddingCache:
    """Embeddings of distinct texts (sentences) from one text encoder, stored in ``text_embs/``.

    Each distinct text is encoded once; :meth:`lookup` returns L2-normalised rows in query order.
    """

    def __init__(self, folder: Path, encoder: str, dim: int, texts: list[str], embs: np.ndarray):
        self.folder, self.encoder, self.dim = folder, encoder, dim
        self.embs = embs
        self.index = {t: i for i, t in enumerate(texts)}

    @classmethod
    def open(
        cls,
        dataset_dir: str | os.PathLike,
        expected_encoder: str | None = None,
        *,
        verify: bool | None = None,
    ) -> TextEmbeddingCache:
        """Open and validate ``text_embs/`` (see the module docstring); ``embs.npy`` is memory-mapped."""
        folder = Path(dataset_dir) / TEXT_EMBS_DIR
        manifest = read_manifest(folder)
        check_encoder(manifest, expected_encoder, folder)
        fix = rerun_preprocessing(dataset_dir, manifest)
        root = Path(dataset_dir)
        records = _file_records(folder, manifest, [TEXTS_FILE, TEXT_EMBS_FILE], fix)
        num_texts = manifest.get("num_texts")
        if manifest["format"] >= 2 and not isinstance(num_texts, int):
            raise damaged(folder / MANIFEST_FILE, root, "lacks keys ['num_texts']", fix)
        _check_files(folder, records, fix, verify)
        texts_path = folder / TEXTS_FILE
        table = read_feather_table(texts_path, root, fix, columns=("text",), rows=num_texts)
        texts = table.column("text").to_pylist()
        if not all(isinstance(t, str) for t in texts):
            raise damaged(texts_path, root, "has empty (null) rows", fix)
        embs = open_npy(
            folder / TEXT_EMBS_FILE,
            root,
            fix,
            shape=(len(texts), manifest["dim"]),
            record=records.get(TEXT_EMBS_FILE),
        )
        cache = cls(folder, manifest["encoder"], manifest["dim"], texts, embs)
        if len(cache.index) != len(texts):
            repeated = next(t for i, t in enumerate(texts) if cache.index[t] != i)
            raise damaged(texts_path, root, f"lists the sentence '{repeated}' twice", fix)
        return cache

    @staticmethod
    def write(
        dataset_dir: str | os.PathLike,
        encoder: str,
        texts: Sequence[str],
        embs,
        encoder_config: dict | None = None,
    ) -> Path:
        """Write the cache for ``texts`` (distinct) with embeddings ``[len(texts), D]`` (normalised here);
        ``encoder_config`` (e.g. the CLIP weights file) is recorded for later stages."""
        array = embs.detach().cpu().float().numpy() if torch.is_tensor(embs) else np.asarray(embs, np.float32)
        array = array / np.clip(np.linalg.norm(array, axis=1, keepdims=True), 1e-12, None)
        texts = list(texts)
        if len(set(texts)) != len(texts) or len(texts) != len(array):
            raise ValueError(
                f"need distinct texts, one per embedding row ({len(texts)} texts, {len(array)} rows)"
            )
        folder = Path(dataset_dir) / TEXT_EMBS_DIR
        with atomic_dir(folder, overwrite=True, own_marker=MANIFEST_FILE) as tmp:
            pd.DataFrame({"text": texts}).to_feather(tmp / TEXTS_FILE)
            files = {
                TEXTS_FILE: file_record(tmp / TEXTS_FILE, len(texts)),
                TEXT_EMBS_FILE: save_npy(tmp / TEXT_EMBS_FILE, array.astype(np.float32)),
            }
            manifest = {
                "format": FORMAT_VERSION,
                "encoder": encoder,
                "dim": int(array.shape[1]),
                "num_texts": len(texts),
                "files": files,
            }
            if encoder_config is not None:
                manifest["encoder_config"] = encoder_config
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return folder

    def missing(self, texts: Iterable[str]) -> list[str]:
        return sorted({t for t in texts if t not in self.index})

    def lookup(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings ``[len(texts), D]``; raises :class:`VillaError` for an unknown text."""
        missing = self.missing(texts)
        if missing:
            raise VillaError(
                f"{len(missing)} sentences are not in {self.folder} (e.g. '{missing[0]}'): "
                f"{rerun_preprocessing(self.folder.parent)}"
            )
        return np.asarray(self.embs[[self.index[t] for t in texts]])


# --------------------------------------------------------------------------- which encoder later stages use
def preprocessed_encoder(
    dataset_dir: str | os.PathLike, encoder: str | None = None, clip_weights: str | None = None
) -> tuple[str, str | None]:
    """The encoder name and CLIP weights file a later stage uses on ``dataset_dir``.

    ``None`` takes what preprocessing recorded in ``text_embs/manifest.json`` (so the stages need no
    repeated ``encoder=``/``clip_weights=``); an explicit encoder other than the recorded one is refused.
    A weights file that only the manifest names must not run code: a TorchScript archive other than OpenAI's
    RN50.pt is refused (:func:`villa.encoders.clip_rn50.check_manifest_weights`); passing it as
    ``clip_weights`` trusts it.
    """
    folder = Path(dataset_dir) / TEXT_EMBS_DIR  # what stage 2 and evaluation read
    manifest = read_manifest(folder)
    check_encoder(manifest, encoder, folder)
    if encoder is None:
        encoder = manifest.get("encoder")
    if clip_weights is None:
        clip_weights = (manifest.get("encoder_config") or {}).get("clip_weights")
        if isinstance(clip_weights, str) and clip_weights:
            from villa.encoders.clip_rn50 import check_manifest_weights

            check_manifest_weights(clip_weights, folder / MANIFEST_FILE)
    return encoder, clip_weights
