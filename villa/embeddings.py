"""Schema of precomputed embeddings: the one reader and writer of ``attr_embs.pth``,
``region_embs/`` and ``text_embs/`` inside a dataset folder.

Layout::

    attr_embs.pth                   dict attribute -> float32 tensor [D], vocabulary order, L2-normalised
    region_embs/manifest.json       {"format", "encoder", "dim", "dataset", "num_images", "num_regions", "shards"}
    region_embs/shard_*.npy         float32 [rows, D] (plain .npy: memory-mappable, no pickle)
    region_embs/region_emb_mapping.feather   image_id, start (global row), num_regions
    text_embs/manifest.json         {"format", "encoder", "dim"}
    text_embs/texts.feather         text (one row per distinct sentence)
    text_embs/embs.npy              float32 [n, D], L2-normalised

Regions of an image are consecutive rows in the order of its ``region_coord``. Shards are
concatenated in manifest order to form the global row index.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from villa.errors import VillaError
from villa.io import atomic_dir, save_torch

FORMAT_VERSION = 1
ATTR_EMBS_FILE = "attr_embs.pth"
REGION_EMBS_DIR = "region_embs"
TEXT_EMBS_DIR = "text_embs"
MANIFEST_FILE = "manifest.json"
MAPPING_FILE = "region_emb_mapping.feather"


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
    if not path.is_file():
        raise VillaError(
            f"no {ATTR_EMBS_FILE} in {dataset_dir}: run python3 preprocess/preprocess_dataset.py --data_dir=... first"
        )
    try:
        embs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise VillaError(f"cannot read {path}: {err}") from None
    names = list(vocabulary) if vocabulary is not None else list(embs)
    missing = [n for n in names if n not in embs]
    if missing:
        raise VillaError(f"{path} has no embedding for attributes {missing}")
    return names, torch.stack([embs[n].float() for n in names])


# --------------------------------------------------------------------------- manifests
def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise VillaError(
            f"no embeddings in {folder}: run python3 preprocess/preprocess_dataset.py --data_dir=... first"
        )
    return json.loads(path.read_text())


def check_encoder(manifest: dict, expected_encoder: str | None, where: str | os.PathLike) -> None:
    """Refuse embeddings computed with another encoder than ``expected_encoder`` (None accepts any)."""
    if expected_encoder is not None and manifest.get("encoder") != expected_encoder:
        raise VillaError(
            f"embeddings in {where} were computed with encoder '{manifest.get('encoder')}' "
            f"(dim {manifest.get('dim')}), but this run uses encoder '{expected_encoder}': "
            f"re-run preprocessing with --encoder={expected_encoder}"
        )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_fresh(manifest: dict, dataset_dir: str | os.PathLike, where: str | os.PathLike) -> None:
    """Refuse embeddings computed from another version of the dataset's annotation table."""
    from villa.datasets.contract import annotations_path

    recorded = manifest.get("annotations_sha256")
    current = annotations_path(dataset_dir)
    if recorded and current.is_file() and file_sha256(current) != recorded:
        raise VillaError(
            f"embeddings in {where} were computed from an older annotations.feather: re-run preprocessing"
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
        self._rows = 0
        self._ctx = None
        self._tmp: Path | None = None

    def __enter__(self) -> RegionEmbeddingWriter:
        self._ctx = atomic_dir(self.dataset_dir / REGION_EMBS_DIR, overwrite=True)
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
        np.save(self._tmp / name, array)
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
        manifest = {
            "format": FORMAT_VERSION,
            "encoder": self.encoder,
            "dim": self.dim,
            "dataset": self.dataset_dir.name,
            "num_images": int(len(image_ids)),
            "num_regions": int(self._rows),
            "shards": self._shards,
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
    def open(cls, dataset_dir: str | os.PathLike, expected_encoder: str | None = None) -> RegionEmbeddings:
        folder = Path(dataset_dir) / REGION_EMBS_DIR
        manifest = read_manifest(folder)
        check_encoder(manifest, expected_encoder, folder)
        check_fresh(manifest, dataset_dir, folder)
        mapping = pd.read_feather(folder / MAPPING_FILE)
        shards = [np.load(folder / s["file"], mmap_mode="r") for s in manifest["shards"]]
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
                f"(e.g. image_id {ids[~present][0]}): re-run preprocessing for this dataset"
            )
        if num_regions is not None:
            stored = self.mapping["num_regions"].to_numpy()[self._row_of.loc[ids].to_numpy()]
            if not np.array_equal(stored, np.asarray(list(num_regions))):
                raise VillaError(
                    f"region counts in {self.folder} do not match the annotations: re-run preprocessing"
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

    def gather(self, image_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded embeddings ``[N, R_max, D]`` and region mask ``[N, R_max]`` (True = real region)."""
        rows, counts = self.rows(image_ids)
        flat = torch.from_numpy(self.take(rows))
        r_max = int(counts.max()) if len(counts) else 0
        mask = torch.arange(r_max)[None, :] < torch.from_numpy(counts)[:, None]
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
    def open(cls, dataset_dir: str | os.PathLike, expected_encoder: str | None = None) -> TextEmbeddingCache:
        folder = Path(dataset_dir) / TEXT_EMBS_DIR
        manifest = read_manifest(folder)
        check_encoder(manifest, expected_encoder, folder)
        texts = pd.read_feather(folder / "texts.feather")["text"].tolist()
        embs = np.load(folder / "embs.npy", mmap_mode="r")
        return cls(folder, manifest["encoder"], int(manifest["dim"]), texts, embs)

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
        folder = Path(dataset_dir) / TEXT_EMBS_DIR
        with atomic_dir(folder, overwrite=True) as tmp:
            pd.DataFrame({"text": list(texts)}).to_feather(tmp / "texts.feather")
            np.save(tmp / "embs.npy", array.astype(np.float32))
            manifest = {"format": FORMAT_VERSION, "encoder": encoder, "dim": int(array.shape[1])}
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
                f"{len(missing)} sentences are not in {self.folder} (e.g. '{missing[0]}'): re-run preprocessing"
            )
        return np.asarray(self.embs[[self.index[t] for t in texts]])


# --------------------------------------------------------------------------- which encoder later stages use
def preprocessed_encoder(
    dataset_dir: str | os.PathLike, encoder: str | None = None, clip_weights: str | None = None
) -> tuple[str, str | None]:
    """The encoder name and CLIP weights file a later stage uses on ``dataset_dir``.

    ``None`` takes what preprocessing recorded in ``text_embs/manifest.json`` (so the stages need no
    repeated ``encoder=``/``clip_weights=``); an explicit encoder other than the recorded one is refused.
    """
    folder = Path(dataset_dir) / TEXT_EMBS_DIR  # what stage 2 and evaluation read
    manifest = read_manifest(folder)
    check_encoder(manifest, encoder, folder)
    if encoder is None:
        encoder = manifest.get("encoder")
    if clip_weights is None:
        clip_weights = (manifest.get("encoder_config") or {}).get("clip_weights")
    return encoder, clip_weights
