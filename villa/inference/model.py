"""Use a trained model: embed texts and image regions, and ground free-text queries in new images.

::

    import villa

    model = villa.load("villa/checkpoints/shapes700/stage2")      # a stage-2 run folder (ViLLA, CLIP, ablations)
    model = villa.load("villa/example_model")                     # an export folder (python -m villa.export)
    model = villa.load("untrained:default")                       # an encoder's untrained image tower
    rows = model.ground("photo.jpg", ["a red star", "two half moons"], regions="proposals", top_k=3)
    # [{"box": [x0, y0, x1, y1], "query": "a red star", "score": 0.93, "cosine": 0.41}, ...]

A :class:`Model` holds the text tower, the trained region image tower and (for trained models) the training
vocabulary. Images go through the same steps as in training: decoded to RGB (:func:`villa.datasets.images.decode_image`),
resized by the encoder's :class:`~villa.datasets.images.ResizePolicy`, scaled to [0, 1]; every region of an image is
embedded in one forward pass by RoIAlign on the tower's feature map (no crops). Boxes are always given and
returned in the pixels of the image as stored (before any resize).

**Scores.** For each (region, query) :meth:`Model.ground` returns two numbers:

- ``score``: ``sigmoid((cos(region, query) - b) / T)`` (:func:`villa.evaluation.detection.region_scores`,
  rule ``"sigmoid"``) where ``b`` is the region's mean cosine to the model's vocabulary prompts (the attributes
  it was trained on) and ``T`` the training temperature. 0.5 means "as close to the query as to the average
  vocabulary prompt"; a query is scored on its own, so it needs no competitors. A model without a vocabulary
  (an untrained tower, or a run whose dataset folder is gone) uses the queries themselves as background; with a
  single query that background is the query itself, so the class score is ``(1 + cosine) / 2`` instead.
  With ``regions="proposals[:K]"`` the score is the geometric mean of that class score and the proposal's
  objectness (:mod:`villa.regions.proposals`), as in zero-shot detection (``docs/regions.md``), so that a
  clutter box that resembles the query ranks below an object that does.
- ``cosine``: the raw cosine similarity of the L2-normalised embeddings.

Text embeddings are cached per query string for the life of the model.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from villa.inference.model_folder import DEFAULT_TEMPERATURE
from villa.storage.errors import VillaError, VillaWarning

#: ``villa.load("untrained:<encoder>")``: the encoder's image tower as built, with no stage-2 training
UNTRAINED_PREFIX = "untrained:"
#: ``villa.load("example")``: the example model shipped inside the package (when no folder of that name exists)
EXAMPLE = "example"
#: the example model's folder
EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "example_model"
#: the score rule of :meth:`Model.ground` (see the module docstring)
SCORE_RULE = "sigmoid"


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the tower: ``pixels`` uint8 ``[H, W, 3]`` as stored (boxes refer to these),
    ``tower`` float ``[1, 3, H', W']`` in [0, 1] at the resize policy's size, ``scale`` (sy, sx) = H'/H, W'/W,
    and ``name`` (the file, or ``"<array>"``)."""

    pixels: np.ndarray
    tower: torch.Tensor
    scale: tuple[float, float]
    name: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def _array_to_rgb(image) -> np.ndarray:
    """A PIL image or an array (``[H, W]``, ``[H, W, 1|3|4]``, uint8 or float in [0, 1]) -> uint8 ``[H, W, 3]``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        from villa.datasets.images import _to_rgb

        return _to_rgb(image)
    if torch.is_tensor(image):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise VillaError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise VillaError(f"an image array must be uint8 or float in [0, 1], got {array.dtype}")
        array = np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


class Model:
    """A text tower and a region image tower, loaded once (see the module docstring); make one with
    :func:`load`.

    Attributes:
        encoder: the :class:`villa.encoders.Encoder` (text tower and recipe).
        image_model: the region image tower (eval mode, on ``device``).
        vocabulary: the training vocabulary (:class:`villa.datasets.vocabulary.Vocabulary`) or None.
        temperature: the stage-2 temperature T of the score rule.
        policy: the :class:`~villa.datasets.images.ResizePolicy` applied to every image.
        source: where the model came from (a folder, or ``untrained:<encoder>``).
        info: what is known of its training (pairs, epoch, dataset, command, metrics; a dict).
    """

    def __init__(
        self,
        encoder,
        image_model: torch.nn.Module,
        *,
        vocabulary=None,
        temperature: float = DEFAULT_TEMPERATURE,
        policy=None,
        device: str | torch.device = "cpu",
        source: str = "",
        info: dict | None = None,
    ):
        from villa.datasets.images import ResizePolicy
        from villa.engine.device import resolve_device

        self.encoder = encoder
        self.device = resolve_device(device)
        self.image_model = image_model.eval().to(self.device)
        self.vocabulary = vocabulary
        self.temperature = float(temperature)
        self.policy = policy if policy is not None else ResizePolicy.of(encoder)
        self.source = str(source)
        self.info = dict(info or {})
        self._text_cache: dict[str, torch.Tensor] = {}
        self._vocabulary_embs: torch.Tensor | None = None

    # ---------------------------------------------------------------- description
    @property
    def dim(self) -> int:
        """Embedding dimension D of both towers."""
        return int(self.encoder.dim)

    @property
    def encoder_name(self) -> str:
        return self.encoder.name

    def __repr__(self) -> str:
        vocab = f"{len(self.vocabulary)} attributes" if self.vocabulary is not None else "no vocabulary"
        return f"villa.Model({self.source!r}, encoder={self.encoder_name!r}, dim={self.dim}, {vocab})"

    # ---------------------------------------------------------------- text
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings float32 ``[N, D]`` (CPU) of ``texts`` (a string counts as one).

        Each distinct string is embedded once per model (cached). A text longer than the text tower reads
        (:attr:`~villa.encoders.Encoder.text_token_limit`) is truncated, with a :class:`~villa.storage.errors.VillaWarning`.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise VillaError("texts must be strings")
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if new:
            self._warn_truncated(new)
            # one text per forward: a text's embedding never depends on what else was asked with it (padding
            # in a batch changes the last bits)
            embs = torch.nn.functional.normalize(self.encoder.encode_text(new, batch_size=1).float(), dim=1)
            self._text_cache.update(zip(new, embs))
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._text_cache[t] for t in texts])

    def _warn_truncated(self, texts: list[str]) -> None:
        limit = self.encoder.text_token_limit
        if not limit:
            return
        for text, count in zip(texts, self.encoder.count_text_tokens(texts)):
            if count > limit:
                shown = text if len(text) <= 40 else text[:37] + "..."
                warnings.warn(
                    f"query '{shown}' has {count} tokens, more than the text tower's limit of {limit}: "
                    f"only its first {limit} are read",
                    VillaWarning,
                    stacklevel=3,
                )

    def vocabulary_embeddings(self) -> torch.Tensor:
        """``[K, D]``: each vocabulary attribute's prompts embedded, averaged and L2-normalised, vocabulary order
        (what preprocessing writes to ``attr_embs.pth``)."""
        if self.vocabulary is None:
            raise VillaError(f"model {self.source} has no vocabulary: give the queries as text")
        if self._vocabulary_embs is None:
            rows = []
            for attr in self.vocabulary.attributes:
                mean = self.encode_text(list(attr.prompts)).mean(0)
                rows.append(mean / mean.norm().clamp(min=1e-12))
            self._vocabulary_embs = torch.stack(rows)
        return self._vocabulary_embs

    def _queries(self, queries) -> tuple[list[str], torch.Tensor]:
        """(labels, embeddings ``[Q, D]``) of ``queries``: a string, a list of strings, or a Vocabulary (each
        attribute by its name, embedded as the mean of its prompts)."""
        from villa.datasets.vocabulary import Vocabulary

        if isinstance(queries, Vocabulary):
            if self.vocabulary is not None and queries is self.vocabulary:
                return queries.names, self.vocabulary_embeddings()
            embs = []
            for attr in queries.attributes:
                mean = self.encode_text(list(attr.prompts)).mean(0)
                embs.append(mean / mean.norm().clamp(min=1e-12))
            return queries.names, torch.stack(embs)
        labels = [queries] if isinstance(queries, str) else list(queries)
        if not labels:
            raise VillaError("the query list is empty: give at least one query")
        if not all(isinstance(q, str) for q in labels):
            raise VillaError("queries must be strings")
        blank = [q for q in labels if not q.strip()]
        if blank:
            raise VillaError("a query is empty: every query needs some text")
        labels = list(dict.fromkeys(labels))  # a repeated query is one query
        return labels, self.encode_text(labels)

    def _background(self, query_embs: torch.Tensor) -> torch.Tensor:
        return self.vocabulary_embeddings() if self.vocabulary is not None else query_embs

    # ---------------------------------------------------------------- images
    def prepare(self, image) -> PreparedImage:
        """Decode and resize ``image`` once (a path, a PIL image, a uint8 ``[H, W, 3]`` array, or an already
        :class:`PreparedImage`): the methods below accept the result, so one image can serve many calls."""
        from villa.datasets.images import decode_image

        if isinstance(image, PreparedImage):
            return image
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            pixels = decode_image(path)
            name = str(path)
        else:
            pixels = _array_to_rgb(image)
            path, name = None, "<array>"
        height, width = pixels.shape[:2]
        out_h, out_w = (int(v) for v in self.policy.output_sizes(np.array([[height, width]]))[0])
        if (out_h, out_w) == (height, width):
            tower = pixels
        elif path is not None:
            tower = decode_image(path, self.policy)  # the very pixels training decoded (JPEG draft included)
        else:
            from PIL import Image

            tower = np.asarray(Image.fromarray(pixels).resize((out_w, out_h), Image.BILINEAR))
        tensor = torch.from_numpy(np.array(tower, dtype=np.uint8)).permute(2, 0, 1)[None].float().div_(255)
        return PreparedImage(pixels, tensor, (out_h / height, out_w / width), name)

    def boxes_for(self, image, regions="proposals") -> np.ndarray:
        """The boxes ``[M, 4]`` float32 (x0, y0, x1, y1, stored pixels) that ``regions`` gives on ``image``:
        ``"proposals"``, ``"proposals:K"``, ``"grid:RxC"`` (:mod:`villa.regions`) or boxes ``[M, 4]``
        (clipped to the image, with a :class:`~villa.storage.errors.VillaWarning` when they stick out)."""
        return self._regions(self.prepare(image), regions)[0]

    def _regions(self, prepared: PreparedImage, regions) -> tuple[np.ndarray, np.ndarray | None]:
        """(boxes ``[M, 4]``, the proposer's objectness ``[M]`` for proposals, else None)."""
        from villa.regions import parse_region_spec, propose_regions

        if isinstance(regions, str):
            spec = parse_region_spec(regions, ("grid", "proposals"), what="regions")
            if spec.kind == "proposals":
                found = propose_regions(prepared.pixels, spec.max_regions)
                return found.boxes, found.scores.astype(np.float64)
            return spec.boxes_for(image=prepared.pixels), None
        return self._clip(prepared, regions), None

    @staticmethod
    def _clip(prepared: PreparedImage, boxes) -> np.ndarray:
        from villa.regions import clip_boxes

        try:
            array = np.asarray(boxes, dtype=np.float64)
        except (TypeError, ValueError):
            raise VillaError("boxes must be numbers [[x0, y0, x1, y1], ...]") from None
        if array.size == 0:
            raise VillaError("no boxes given: give at least one [x0, y0, x1, y1]")
        if array.ndim != 2 or array.shape[1] != 4:
            raise VillaError(f"boxes must have shape [M, 4] (x0, y0, x1, y1), got {tuple(array.shape)}")
        if not np.isfinite(array).all():
            raise VillaError("boxes hold non-finite coordinates")
        flipped = (array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1])
        if flipped.any():
            i = int(np.flatnonzero(flipped)[0])
            raise VillaError(f"box {i} {array[i].tolist()} is not [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        clipped, kept = clip_boxes(array, prepared.height, prepared.width)
        if not kept.all():
            i = int(np.flatnonzero(~kept)[0])
            raise VillaError(
                f"box {i} {array[i].tolist()} lies outside the {prepared.width}x{prepared.height} image {prepared.name}"
            )
        moved = np.flatnonzero((clipped != array).any(1))
        if len(moved):
            i = int(moved[0])
            warnings.warn(
                f"{len(moved)} box(es) extend outside the {prepared.width}x{prepared.height} image {prepared.name} "
                f"and were clipped to it (e.g. box {i} {array[i].tolist()} -> {clipped[i].tolist()})",
                VillaWarning,
                stacklevel=4,
            )
        return clipped.astype(np.float32)

    @torch.no_grad()
    def encode_regions(self, image, boxes) -> torch.Tensor:
        """L2-normalised embeddings float32 ``[M, D]`` (CPU) of ``boxes`` ``[M, 4]`` (x0, y0, x1, y1 in the
        image's own pixels) on ``image`` (path, PIL image, uint8 array or :class:`PreparedImage`), all in one
        forward pass. Boxes outside the image are clipped with a warning."""
        prepared = self.prepare(image)
        return self._embed(prepared, self._clip(prepared, boxes))

    @torch.no_grad()
    def _embed(self, prepared: PreparedImage, boxes: np.ndarray) -> torch.Tensor:
        """``[M, D]`` normalised embeddings of already valid boxes (stored pixels)."""
        from villa.datasets.images import scale_boxes

        if len(boxes) == 0:
            return torch.zeros(0, self.dim)
        scales = np.tile(np.asarray(prepared.scale, dtype=np.float64), (len(boxes), 1))
        scaled = torch.from_numpy(scale_boxes(boxes, scales))
        rows = torch.cat([torch.zeros(len(scaled), 1), scaled], dim=1).to(self.device)
        embs = self.image_model(prepared.tower.to(self.device), rows).float()
        return torch.nn.functional.normalize(embs, dim=1).cpu()

    # ---------------------------------------------------------------- scoring
    def score(
        self, image, queries, regions="proposals"
    ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        """Every region against every query, before any selection: (boxes ``[M, 4]``, query labels ``[Q]``,
        scores ``[M, Q]``, cosines ``[M, Q]``). Arguments as :meth:`ground`."""
        from villa.evaluation.detection import region_scores, with_objectness

        prepared = self.prepare(image)
        labels, query_embs = self._queries(queries)
        boxes, objectness = self._regions(prepared, regions)
        region_embs = self._embed(prepared, boxes)
        if self.vocabulary is None and len(query_embs) == 1:
            # the query is its own background: the sigmoid rule would give 0.5 to every region
            scores = (1.0 + region_scores(region_embs, query_embs, "cosine")) / 2
        else:
            scores = region_scores(
                region_embs,
                query_embs,
                SCORE_RULE,
                self.temperature,
                background_embs=self._background(query_embs),
            )
        if objectness is not None:  # proposals: the class score's geometric mean with the box's objectness
            scores = with_objectness(scores, objectness)
        cosines = region_scores(region_embs, query_embs, "cosine")
        return boxes, labels, scores, cosines

    def ground(
        self,
        image,
        queries,
        regions="proposals",
        *,
        top_k: int | None = 5,
        score_threshold: float = 0.0,
        nms_iou: float | None = 0.5,
    ) -> list[dict]:
        """Where each query is in ``image``: rows ``{"box": [x0, y0, x1, y1], "query", "score", "cosine"}``,
        best score first (ties: higher cosine first).

        Args:
            image: a path, a PIL image, a uint8 ``[H, W, 3]`` array or a :class:`PreparedImage`.
            queries: a string, a list of strings, or a :class:`~villa.datasets.vocabulary.Vocabulary` (e.g.
                ``model.vocabulary``: each attribute by its name, embedded as the mean of its prompts).
            regions: ``"proposals"``, ``"proposals:K"``, ``"grid:RxC"`` or boxes ``[M, 4]`` in the image's pixels.
            top_k: at most this many boxes per query (None: all).
            score_threshold: drop rows whose score is below this (scores are in [0, 1]).
            nms_iou: per query, drop a box whose IoU with a better one of the same query exceeds this
                (None: no suppression).
        """
        from villa.regions import nms

        if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise VillaError(f"top_k must be a positive integer or None, got {top_k!r}")
        if nms_iou is not None and not 0.0 < float(nms_iou) <= 1.0:
            raise VillaError(f"nms_iou must be in (0, 1], got {nms_iou!r}")
        boxes, labels, scores, cosines = self.score(image, queries, regions)
        m, q = scores.shape
        if m == 0:
            return []
        flat_box = np.repeat(np.arange(m), q)
        flat_query = np.tile(np.arange(q), m)
        flat_score, flat_cos = scores.ravel(), cosines.ravel()
        # one ranking key: by score, ties by cosine
        order = np.lexsort((-flat_cos, -flat_score))
        rank = np.empty(len(order), dtype=np.float64)
        rank[order] = np.arange(len(order), 0, -1)
        keep = flat_score >= float(score_threshold)
        candidates = np.flatnonzero(keep)
        if nms_iou is not None and float(nms_iou) < 1.0 and len(candidates):
            kept = nms(boxes[flat_box[candidates]], rank[candidates], float(nms_iou), flat_query[candidates])
            candidates = candidates[kept]
        candidates = candidates[np.argsort(-rank[candidates], kind="stable")]
        if top_k is not None:
            seen = np.zeros(q, dtype=np.int64)
            chosen = []
            for i in candidates.tolist():
                if seen[flat_query[i]] < top_k:
                    seen[flat_query[i]] += 1
                    chosen.append(i)
            candidates = np.asarray(chosen, dtype=np.int64)
        return [
            {
                "box": [float(v) for v in boxes[flat_box[i]]],
                "query": labels[flat_query[i]],
                "score": float(flat_score[i]),
                "cosine": float(flat_cos[i]),
            }
            for i in candidates.tolist()
        ]

    def heatmaps(self, image, queries, cells: int = 24, window: int = 4) -> tuple[list[str], np.ndarray]:
        """Dense region scores: (query labels, maps float32 ``[Q, H, W]`` in [0, 1] at the stored size).

        The image is covered by a lattice of ``cells`` cells along its longer side (square cells); every
        ``window x window``-cell square of the lattice is one region (all of them in one forward pass), scored
        as in :meth:`ground`, and each pixel gets the mean score of the regions that cover it.
        """
        if cells < 2 or not 1 <= window <= cells:
            raise VillaError(f"heatmap cells must be >= 2 and window in [1, cells], got {cells} and {window}")
        prepared = self.prepare(image)
        height, width = prepared.height, prepared.width
        step = max(height, width) / cells
        rows, cols = max(1, round(height / step)), max(1, round(width / step))
        win_r, win_c = min(window, rows), min(window, cols)
        ys = np.linspace(0, height, rows + 1)
        xs = np.linspace(0, width, cols + 1)
        tops, lefts = np.meshgrid(np.arange(rows - win_r + 1), np.arange(cols - win_c + 1), indexing="ij")
        tops, lefts = tops.ravel(), lefts.ravel()
        boxes = np.stack([xs[lefts], ys[tops], xs[lefts + win_c], ys[tops + win_r]], 1).astype(np.float32)
        _, labels, scores, _ = self.score(prepared, queries, boxes)
        # each cell: the mean over the windows covering it (box filter of the window scores)
        total = np.zeros((len(labels), rows, cols))
        count = np.zeros((rows, cols))
        for dr in range(win_r):
            for dc in range(win_c):
                total[:, tops + dr, lefts + dc] += scores.T
                count[tops + dr, lefts + dc] += 1
        cell_maps = (total / np.maximum(count, 1)).astype(np.float32)
        from PIL import Image

        # bilinear between cell centres: a smooth map, not a mosaic of cells
        maps = np.stack(
            [
                np.asarray(Image.fromarray(m, mode="F").resize((width, height), Image.BILINEAR))
                for m in cell_maps
            ]
        )
        return labels, maps.astype(np.float32)


# --------------------------------------------------------------------------- loading
def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    vocabulary=None,
    clip_weights: str | os.PathLike | None = None,
) -> Model:
    """Load a model once, for :meth:`Model.encode_text`, :meth:`Model.encode_regions` and :meth:`Model.ground`.

    ``path``:

    - a stage-2 run folder (``python -m villa.stage2``: ViLLA, the CLIP baseline or an ablation), or its
      ``best.pkl``/``last.pkl``: the weights, with the encoder, CLIP weights file and vocabulary of the dataset
      it was trained on (the run's recorded ``data_dir``);
    - an export folder (``python -m villa.export``), which needs no dataset folder;
    - ``"untrained:<encoder>"`` (``untrained:default``, ``untrained:mobilenet_v2``, ``untrained:clip_rn50`` with
      ``clip_weights=``): the encoder's image tower as built, no vocabulary;
    - ``"example"``: the example model shipped with villa (``villa/example_model``).

    ``vocabulary``: an ``attributes.yaml`` path or a :class:`~villa.datasets.vocabulary.Vocabulary` that replaces
    the model's own (e.g. to give an untrained tower the vocabulary a trained model is compared on).
    Bad input (a missing or damaged folder, another format version) is one :class:`VillaError` line.
    """
    from villa.inference import model_folder

    text = str(path)
    if text.startswith(UNTRAINED_PREFIX):
        model = _load_untrained(text[len(UNTRAINED_PREFIX) :], device, clip_weights)
    else:
        folder = Path(path).expanduser()
        if not folder.exists() and text == EXAMPLE:
            folder = EXAMPLE_DIR
        checkpoint = None
        if folder.is_file() and folder.suffix == ".pkl":
            folder, checkpoint = folder.parent, folder
        if not folder.exists():
            raise VillaError(
                f"no model at {path}: give a stage-2 run folder, an export folder (python -m villa.export), "
                f"'{EXAMPLE}' or '{UNTRAINED_PREFIX}<encoder>'"
            )
        if model_folder.is_model_folder(folder):
            parts = model_folder.read_model_folder(folder, device)
            model = Model(parts.pop("encoder"), parts.pop("image_model"), **parts)
        elif checkpoint is not None or (folder / "best.pkl").is_file() or (folder / "last.pkl").is_file():
            model = _load_run(folder, checkpoint, device, clip_weights)
        else:
            raise VillaError(
                f"{path} is not a villa model: expected a stage-2 run folder (with best.pkl) or an export folder "
                f"(with {model_folder.CONFIG_FILE})"
            )
    if vocabulary is not None:
        from villa.datasets.vocabulary import Vocabulary, load_vocabulary_file

        model.vocabulary = (
            vocabulary if isinstance(vocabulary, Vocabulary) else load_vocabulary_file(vocabulary)
        )
        model._vocabulary_embs = None
    return model


def _load_untrained(name: str, device, clip_weights) -> Model:
    from villa.encoders import get_encoder

    if not name:
        raise VillaError(f"give the encoder: {UNTRAINED_PREFIX}default, {UNTRAINED_PREFIX}mobilenet_v2, ...")
    enc = get_encoder(name, clip_weights=None if clip_weights is None else str(clip_weights), device=device)
    return Model(
        enc,
        enc.build_image_model(),
        device=device,
        source=f"{UNTRAINED_PREFIX}{name}",
        info={"pairs": "untrained", "encoder_config": enc.config},
    )


def _load_run(folder: Path, checkpoint: Path | None, device, clip_weights) -> Model:
    """A stage-2 run folder: ``best.pkl`` (else ``last.pkl``) and the dataset its config names."""
    from villa.encoders import get_encoder
    from villa.engine.checkpoints import BEST, LAST, load_checkpoint, unwrap

    if checkpoint is None:
        checkpoint = folder / BEST if (folder / BEST).is_file() else folder / LAST
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    extra = ckpt.get("extra") if isinstance(ckpt.get("extra"), dict) else {}
    if config.get("stage") not in (None, "stage2") or (
        "pairs" not in extra and config.get("stage") != "stage2"
    ):
        raise VillaError(
            f"{checkpoint} is not a stage-2 checkpoint (stage {config.get('stage') or 'unknown'}): give the run "
            "folder of python -m villa.stage2"
        )
    encoder, weights, vocabulary, dataset_info = _run_dataset(folder, config, extra, clip_weights)
    enc = get_encoder(encoder, clip_weights=weights, device=device)
    trained_with = extra.get("encoder")
    if trained_with is not None and trained_with != enc.name:
        raise VillaError(f"{checkpoint} was trained with encoder '{trained_with}', not '{enc.name}'")
    model = enc.build_image_model()
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as err:
        from villa.storage.artifacts import one_line

        raise VillaError(
            f"{checkpoint} does not fit encoder '{enc.name}''s image tower ({one_line(err)})"
        ) from None
    info = {
        "pairs": extra.get("pairs", config.get("pairs")),
        "epoch": _epochs_run(folder, ckpt.get("epoch")),
        "best_epoch": ckpt.get("best_epoch"),
        "checkpoint": str(checkpoint.resolve()),
        "run_dir": str(folder.resolve()),
        "config": config,
        "encoder_config": enc.config,
        **dataset_info,
    }
    return Model(
        enc,
        model,
        vocabulary=vocabulary,
        temperature=float(config.get("tau", DEFAULT_TEMPERATURE)),
        device=device,
        source=str(folder),
        info=info,
    )


def _run_dataset(
    folder: Path, config: dict, extra: dict, clip_weights
) -> tuple[str, str | None, object, dict]:
    """(encoder, CLIP weights, vocabulary or None, dataset facts) of a run: from its dataset folder when it is
    there, else from what the checkpoint recorded (no vocabulary then, with a warning)."""
    from villa.datasets import Dataset
    from villa.features.embeddings import preprocessed_encoder
    from villa.storage.paths import resolve_dataset_dir

    data_dir = config.get("data_dir")
    try:
        root = resolve_dataset_dir(data_dir, config.get("data_root")) if data_dir else None
    except VillaError:
        root = None
    if root is None:
        encoder = extra.get("encoder")
        if not encoder:
            raise VillaError(
                f"the dataset of {folder} ({data_dir or 'not recorded'}) is not there and its checkpoint names no "
                "encoder: restore the dataset folder, or load an export of the run"
            )
        warnings.warn(
            f"the dataset folder of {folder} ({data_dir}) is not there: the model has no vocabulary "
            "(scores use the queries as background; queries=vocabulary is unavailable)",
            VillaWarning,
            stacklevel=4,
        )
        weights = clip_weights or (extra.get("encoder_config") or {}).get("clip_weights")
        if clip_weights is None and weights and encoder == "clip_rn50":
            from villa.encoders.clip_rn50 import check_manifest_weights

            check_manifest_weights(weights, folder / "best.pkl")  # named by the run, not by you: no code runs
        return encoder, weights, None, {}
    dataset = Dataset.open(root)
    encoder, weights = preprocessed_encoder(
        dataset.root, None, None if clip_weights is None else str(clip_weights)
    )
    facts = {
        "dataset": dataset.name,
        "dataset_dir": str(dataset.root),
        "dataset_command": dataset.info.get("created_by"),
        "dataset_images": dataset.info.get("num_images"),
        "dataset_source": dataset.info.get("source"),
    }
    return encoder, weights, dataset.vocabulary, facts


def export_model(
    model,
    out: str | os.PathLike,
    *,
    float16: bool = False,
    clip_weights: str | os.PathLike | None = None,
    note: str | None = None,
) -> Path:
    """Export ``model`` (a :class:`villa.inference.model.Model`, or what :func:`villa.load` opens: a stage-2 run folder,
    another export, ``untrained:<encoder>``) into the folder ``out``; returns ``out``. ``note``: a paragraph added
    to the model card (e.g. how the model was made). See :func:`write_model_folder`."""
    from villa.inference.model_folder import write_model_folder

    if not hasattr(model, "image_model"):
        model = load(model, clip_weights=clip_weights)
    return write_model_folder(model, out, float16=float16, note=note)


def _epochs_run(run_dir: Path, fallback):
    """The epochs a training run ran (its ``metrics.csv``): ``best.pkl`` records the best epoch, not the last."""
    from villa.engine.training import read_metrics

    try:
        rows = read_metrics(run_dir)
    except (OSError, ValueError, KeyError):
        return fallback
    return int(rows[-1]["epoch"]) if rows else fallback
