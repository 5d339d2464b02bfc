"""OpenAI CLIP RN50 from a local file or from open_clip's download and cache, both towers built by
open-clip-torch.

Weights are identified by the full SHA256 of the file (``config["weights_sha256"]``), computed once per
file version (path, size, mtime) in a process.

Accepted ``--clip_weights``:

* ``openai``: OpenAI's RN50 as open_clip obtains it for ``pretrained="openai"`` (its Hugging Face Hub copy
  ``timm/resnet50_clip.openai``, a safetensors state dict, in the Hub cache; or OpenAI's own ``RN50.pt``
  in open_clip's URL cache ``~/.cache/clip``). A cached file is used without any network access; else it
  is downloaded, and offline it stops with one line naming the file to supply;
* the OpenAI ``RN50.pt`` TorchScript archive. **Loading a TorchScript archive runs code stored in the
  file**: use only a file from a trusted source. OpenAI's published file is recognised by its full SHA256;
  any other TorchScript file loads with a warning when the user names it (``--clip_weights=``,
  ``clip_weights=``), and is refused when only a dataset's ``text_embs/manifest.json`` names it
  (:func:`check_manifest_weights`): a shared dataset folder must not be able to run code. State dicts never
  run code (``weights_only=True``; safetensors);
* a state dict (``torch.save`` file or ``.safetensors``) of a CLIP RN50 model (open_clip / OpenAI key layout), optionally nested under
  ``"state_dict"`` or ``"model"`` and/or with a ``"module."`` prefix;
* a visual-only state dict (the reference repo's ``clip.pth``): ``ModifiedResNet`` keys, bare or
  under any prefix such as ``"visual."``. Such a file gives the image tower only; ``encode_text``
  then raises :class:`VillaError`.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from villa.encoders.base import Encoder, register_encoder
from villa.encoders.clip_resnet import RegionImageEncoder, build_modified_resnet
from villa.storage.artifacts import cached_sha256
from villa.storage.errors import VillaError

RN50_DIM = 1024
RN50_LAYERS = (3, 4, 6, 3)
RN50_WIDTH = 64
RN50_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
#: keys in OpenAI's archive that are metadata, not parameters
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
_VISUAL_ANCHOR = "layer1.0.conv1.weight"
_TEXT_ANCHOR = "token_embedding.weight"


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def weights_sha256(path: str | os.PathLike) -> str:
    """The full SHA256 of a weights file, hashed once per (path, size, mtime) in this process."""
    return cached_sha256(path)


def is_openai_rn50(path: str | os.PathLike) -> bool:
    """Whether the file's full SHA256 is that of OpenAI's published RN50.pt (carried by open_clip's URL)."""
    try:
        published = _openai_sha256(_openai_cfg())
    except VillaError:  # open_clip without an RN50 "openai" entry: nothing to compare with
        return False
    return len(published) == 64 and weights_sha256(path) == published


def check_manifest_weights(path: str | os.PathLike, named_by: str | os.PathLike) -> None:
    """Refuse (one line) a TorchScript archive that only a dataset file (``named_by``) names, unless it is
    OpenAI's RN50.pt: loading it would run code that whoever wrote the dataset chose. State dicts pass."""
    path = Path(path).expanduser()
    if path.is_file() and _is_torchscript(path) and not is_openai_rn50(path):
        raise VillaError(
            f"the CLIP weights '{path}' named by {named_by} are a TorchScript archive, and loading one runs code "
            f"stored in the file: to trust it, pass it yourself with --clip_weights={path} (preprocessing) or "
            f"clip_weights={path} (the stages)"
        )


def _warn_untrusted_torchscript(path: Path) -> None:
    """Say once (rank 0) that a TorchScript archive runs code, unless it is OpenAI's published RN50.pt."""
    if is_openai_rn50(path):
        return
    if os.environ.get("RANK", "0") == "0":
        print(
            f"warning: '{path}' is a TorchScript archive, and loading it runs code stored in the file: use "
            "only a file from a trusted source (OpenAI's published RN50.pt is recognised by its SHA256 and "
            "loads without this warning; a state dict loads without running code)",
            file=sys.stderr,
            flush=True,
        )


def _read_file(path: Path) -> dict:
    """The state dict of a TorchScript archive, or the tensors-only object in a ``torch.save`` or
    safetensors file."""
    torchscript = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if _is_torchscript(path):
            torchscript = True
            _warn_untrusted_torchscript(path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        return torch.load(path, map_location="cpu", weights_only=True)
    except VillaError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = (
            "a TorchScript archive that torch.jit.load cannot read (it must come from a trusted source: "
            "loading one runs its code)"
            if torchscript
            else "neither a TorchScript archive nor a tensors-only state dict"
        )
        raise VillaError(f"cannot read CLIP weights '{path}': {what} ({first})") from None


def _unwrap(obj) -> dict[str, torch.Tensor]:
    """Find the flat name -> tensor mapping inside common checkpoint wrappers."""
    for _ in range(3):
        if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
            inner = next(
                (obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)), None
            )
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj:
        return {}
    return {str(k): v for k, v in obj.items() if torch.is_tensor(v)}


def _split_by_prefix(state: dict[str, torch.Tensor], anchor: str):
    """Keys sharing the prefix in front of ``anchor`` (stripped), or None when ``anchor`` is absent."""
    hits = sorted((k for k in state if k.endswith(anchor)), key=len)
    if not hits:
        return None, None
    prefix = hits[0][: -len(anchor)]
    return prefix, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_clip_rn50_weights(path: str | os.PathLike) -> tuple[dict, dict | None]:
    """Read ``path`` and return (visual state dict, text state dict or None), float32, validated.

    Raises :class:`VillaError` (one line) for a missing/unreadable file or a non-RN50 key layout.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise VillaError(f"CLIP weights file not found: '{path}'")
    state = _unwrap(_read_file(path))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    for key in _OPENAI_META_KEYS:
        state.pop(key, None)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}

    visual_prefix, visual = _split_by_prefix(state, _VISUAL_ANCHOR)
    if visual is None:
        raise VillaError(
            f"'{path}' holds no CLIP modified-ResNet weights (no key ending in '{_VISUAL_ANCHOR}'): "
            "expected OpenAI RN50.pt or a CLIP RN50 state dict"
        )
    text = None
    if any(k.endswith(_TEXT_ANCHOR) for k in state):
        text_prefix, text = _split_by_prefix(state, _TEXT_ANCHOR)
        text = {k: v for k, v in text.items() if not (text_prefix + k).startswith(visual_prefix)}
        text.pop("logit_scale", None)
        text.pop("logit_bias", None)
    _check_keys(rn50_visual_shapes(), visual, path, "visual")
    return visual, text


def rn50_visual_shapes() -> dict[str, torch.Size]:
    """Key -> shape of an RN50 ``ModifiedResNet`` state dict (built on the meta device: no init cost)."""
    with torch.device("meta"):
        return {
            k: v.shape
            for k, v in build_modified_resnet(RN50_LAYERS, RN50_WIDTH, RN50_DIM).state_dict().items()
        }


def _check_keys(expected: dict[str, torch.Size], state: dict, path: Path, what: str) -> None:
    """Same keys and shapes as ``expected``, else a one-line VillaError naming the first differences."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing:
        detail = f"{len(missing)} missing (e.g. {missing[:2]})"
    elif unexpected:
        detail = f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
    elif bad:
        detail = f"{len(bad)} with wrong shapes (e.g. {bad[0]}: {tuple(state[bad[0]].shape)} != {tuple(expected[bad[0]])})"
    else:
        return
    raise VillaError(f"'{path}' is not a CLIP RN50 checkpoint: {what} tower keys {detail}")


def _build_text_tower() -> nn.Module:
    from open_clip.model import CLIPTextCfg, _build_text_tower

    return _build_text_tower(RN50_DIM, CLIPTextCfg(**RN50_TEXT), quick_gelu=True)


class ClipRN50Encoder(Encoder):
    """OpenAI CLIP RN50: image tower = ``ModifiedResNet`` (3,4,6,3) width 64, text tower = CLIP's
    12-layer transformer with open_clip's BPE tokenizer (ships with the package). D = 1024."""

    name = "clip_rn50"
    dim = RN50_DIM

    def __init__(self, clip_weights: str | os.PathLike, device: torch.device):
        self.weights_path = Path(clip_weights).expanduser().resolve()
        self.device = device
        self._visual_state, text_state = load_clip_rn50_weights(self.weights_path)
        self._digest = weights_sha256(self.weights_path)
        self._text = None
        if text_state is not None:
            from open_clip.tokenizer import SimpleTokenizer

            self._text = _build_text_tower()
            _check_keys(
                {k: v.shape for k, v in self._text.state_dict().items()},
                text_state,
                self.weights_path,
                "text",
            )
            self._text.load_state_dict(text_state)
            self._text.eval().to(device)
            self._tokenizer = SimpleTokenizer(context_length=RN50_TEXT["context_length"])

    @property
    def config(self) -> dict:
        return {
            "name": self.name,
            "clip_weights": str(self.weights_path),
            "weights_sha256": self._digest,
            "image_layers": list(RN50_LAYERS),
            "image_width": RN50_WIDTH,
            "has_text_tower": self.has_text_tower,
            "dim": self.dim,
        }

    @property
    def has_text_tower(self) -> bool:
        return self._text is not None

    @torch.no_grad()  # not inference_mode: callers may use the result next to tensors that need grad
    def encode_text(self, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
        if self._text is None:
            raise VillaError(
                f"'{self.weights_path}' holds only CLIP's visual tower: text embeddings need the full "
                "CLIP RN50 checkpoint (e.g. OpenAI's RN50.pt)"
            )
        batch_size = batch_size or 256
        out = [
            self._text(self._tokenizer(list(texts[s : s + batch_size])).to(self.device)).float().cpu()
            for s in range(0, len(texts), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @property
    def text_token_limit(self) -> int:
        return RN50_TEXT["context_length"]

    def count_text_tokens(self, texts: list[str]) -> list[int]:
        if self._text is None:
            return [0] * len(texts)
        # the tokenizer adds a start and an end token and cuts at the context length
        return [len(self._tokenizer.encode(text)) + 2 for text in texts]

    def build_image_model(self) -> RegionImageEncoder:
        # built on meta then given copies of the weights: skips a random init that would be overwritten
        with torch.device("meta"):
            visual = build_modified_resnet(RN50_LAYERS, RN50_WIDTH, RN50_DIM)
        visual.load_state_dict({k: v.clone() for k, v in self._visual_state.items()}, assign=True)
        return RegionImageEncoder(visual).eval()


# --------------------------------------------------------------------------- clip_weights=openai
#: the ``clip_weights`` value that asks for OpenAI's RN50 through open_clip's download and cache
OPENAI = "openai"
#: seconds to wait for a TCP connection to the download host before calling the machine offline
PROBE_TIMEOUT_S = 5.0


def _openai_cfg() -> dict:
    """open_clip's pretrained entry for ``RN50`` / ``openai`` (download URL, Hub id)."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg("RN50", OPENAI)
    if not cfg or not (cfg.get("url") or cfg.get("hf_hub")):
        raise VillaError("this open_clip version has no 'openai' weights for RN50: pass --clip_weights=PATH")
    return cfg


def _openai_sha256(cfg: dict) -> str:
    """OpenAI's URLs carry the file's SHA256 (open_clip checks downloads against it)."""
    url = cfg.get("url", "")
    return url.split("/")[-2] if "openaipublic" in url else "-"


def url_cache_path(cfg: dict | None = None) -> Path:
    """Where open_clip's URL download keeps ``RN50.pt`` (``download_pretrained_from_url``'s default)."""
    cfg = cfg or _openai_cfg()
    return Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg.get("url") or "RN50.pt")


def _hf_cached(cfg: dict) -> Path | None:
    """The Hub cache's copy of open_clip's ``hf_hub`` entry (safetensors first, as open_clip), or None."""
    if not cfg.get("hf_hub"):
        return None
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    model_id, filename = os.path.split(cfg["hf_hub"])
    for name in [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]:
        hit = try_to_load_from_cache(model_id, name)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


def find_cached_openai_rn50(cfg: dict | None = None) -> Path | None:
    """OpenAI's RN50 already in open_clip's caches (no network): the Hub copy, else a ``~/.cache/clip/RN50.pt``
    whose SHA256 is OpenAI's."""
    cfg = cfg or _openai_cfg()
    hit = _hf_cached(cfg)
    if hit is not None:
        return hit
    target = url_cache_path(cfg)
    if target.is_file() and weights_sha256(target) == _openai_sha256(cfg):
        return target
    return None


def _offline_reason(cfg: dict) -> str | None:
    """Why a download cannot work right now, found in at most :data:`PROBE_TIMEOUT_S`; None if it may."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return None  # only the proxy knows: let the download try
    endpoint = urlparse(constants.ENDPOINT if cfg.get("hf_hub") else cfg["url"])
    host, port = endpoint.hostname, endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"no network: {host} unreachable ({err or type(err).__name__})"
    return None


def _supply_hint(cfg: dict) -> str:
    target = url_cache_path(cfg)
    bad = " (the file there now is not OpenAI's: its SHA256 differs)" if target.is_file() else ""
    return (
        f"download {cfg.get('url') or 'RN50.pt'} where there is a network and pass its path, "
        f"clip_weights=/path/to/RN50.pt (--clip_weights=... for preprocessing), or put it at {target}{bad}"
    )


def fetch_openai_rn50() -> Path:
    """OpenAI's CLIP RN50 weights file through open_clip's own cache and download.

    A cached copy is used without touching the network. Otherwise open_clip downloads it (the Hub copy
    when ``huggingface_hub`` is installed, as ``open_clip.create_model("RN50", pretrained="openai")``
    does), unless a quick probe finds no network: then a one-line :class:`VillaError` names the file to
    supply and where.
    """
    cfg = _openai_cfg()
    cached = find_cached_openai_rn50(cfg)
    if cached is not None:
        return cached
    reason = _offline_reason(cfg)
    if reason is not None:
        raise VillaError(f"cannot obtain OpenAI's CLIP RN50 weights ({reason}): {_supply_hint(cfg)}")
    from open_clip.pretrained import download_pretrained

    try:
        return Path(download_pretrained(cfg))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VillaError(
            f"cannot download OpenAI's CLIP RN50 weights ({first}): {_supply_hint(cfg)}"
        ) from None


@register_encoder("clip_rn50")
def _clip_rn50(name: str = "clip_rn50", clip_weights=None, device="cpu") -> ClipRN50Encoder:
    if not clip_weights:
        raise VillaError(
            "encoder 'clip_rn50' needs --clip_weights=PATH (OpenAI RN50.pt or a CLIP state dict) "
            f"or --clip_weights={OPENAI} (open_clip's download and cache)"
        )
    if str(clip_weights) == OPENAI:
        clip_weights = fetch_openai_rn50()
    return ClipRN50Encoder(clip_weights, torch.device(device))
