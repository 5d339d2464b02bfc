"""Weights run no code unless asked: a TorchScript archive that only a dataset's manifest names is refused
(unless it is OpenAI's RN50.pt, by its full SHA256); weights are identified by their full SHA256, hashed once
per file version; a real open_clip RN50 state dict in safetensors loads and embeds as open_clip does."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from villa.encoders import clip_rn50
from villa.features.embeddings import TextEmbeddingCache, preprocessed_encoder
from villa.storage.errors import VillaError


def _dataset_naming(folder, weights) -> None:
    """A dataset folder whose ``text_embs/manifest.json`` names ``weights`` as its CLIP weights."""
    TextEmbeddingCache.write(
        folder,
        "clip_rn50",
        ["a cat"],
        np.ones((1, 4), np.float32),
        encoder_config={"clip_weights": str(weights)},
    )


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_a_torchscript_named_only_by_a_manifest_is_refused(tmp_path, monkeypatch):
    archive = tmp_path / "weights.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), archive)
    _dataset_naming(tmp_path / "shared", archive)
    with pytest.raises(VillaError) as info:
        preprocessed_encoder(tmp_path / "shared")
    message = str(info.value)
    assert "\n" not in message and "TorchScript archive" in message and "runs code" in message
    assert f"--clip_weights={archive}" in message and f" clip_weights={archive}" in message
    assert "text_embs/manifest.json" in message

    # named by the user: trusted (it then loads with the warning)
    assert preprocessed_encoder(tmp_path / "shared", clip_weights=str(archive)) == ("clip_rn50", str(archive))
    # OpenAI's published RN50.pt, recognised by its full SHA256, is accepted from a manifest too
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(
        clip_rn50, "_openai_cfg", lambda: {"url": f"https://openaipublic.azureedge.net/x/{sha}/RN50.pt"}
    )
    assert preprocessed_encoder(tmp_path / "shared") == ("clip_rn50", str(archive))
    # ... but not a file whose SHA256 merely starts like it
    monkeypatch.setattr(
        clip_rn50, "_openai_cfg", lambda: {"url": f"https://openaipublic.azureedge.net/x/{sha[:8]}/RN50.pt"}
    )
    with pytest.raises(VillaError, match="TorchScript archive"):
        preprocessed_encoder(tmp_path / "shared")


def test_a_state_dict_named_by_a_manifest_is_accepted(tmp_path):
    weights = tmp_path / "clip.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)  # (its layout is checked when it is loaded)
    _dataset_naming(tmp_path / "shared", weights)
    assert preprocessed_encoder(tmp_path / "shared") == ("clip_rn50", str(weights))


def test_weights_are_identified_by_their_full_sha256_hashed_once(tmp_path, monkeypatch):
    """Two files that share their first MiB and their size are two different weights; a file is hashed once
    per (path, size, mtime) in a process, and again when it changes."""
    import villa.storage.artifacts

    head = b"\0" * (1 << 20)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(head + b"weights A")
    b.write_bytes(head + b"weights B")
    assert clip_rn50.weights_sha256(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert clip_rn50.weights_sha256(a) != clip_rn50.weights_sha256(b)

    calls = []
    real = villa.storage.artifacts.file_sha256
    monkeypatch.setattr(villa.storage.artifacts, "file_sha256", lambda path: calls.append(path) or real(path))
    c = tmp_path / "c.pt"
    c.write_bytes(b"weights C")
    for _ in range(3):
        clip_rn50.weights_sha256(c)
    assert len(calls) == 1
    c.write_bytes(b"weights C, retrained")
    assert clip_rn50.weights_sha256(c) == hashlib.sha256(c.read_bytes()).hexdigest() and len(calls) == 2


@pytest.mark.slow
def test_open_clip_rn50_safetensors_loads_and_embeds_as_open_clip(tmp_path, monkeypatch):
    """A valid safetensors state dict of open_clip's RN50 (random weights, built without a download) loads as
    ``clip_weights``, and both towers give open_clip's own embeddings; its identity is the full SHA256."""
    import open_clip
    from safetensors.torch import save_file

    import villa.storage.artifacts
    from villa.encoders import get_encoder

    torch.manual_seed(0)
    model = open_clip.create_model("RN50-quickgelu", pretrained=None).eval()
    with (
        torch.no_grad()
    ):  # float16 on disk (half the bytes): the reference model holds the same rounded values
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    state = {
        k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
        for k, v in model.state_dict().items()
    }
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    del state

    calls = []
    real = villa.storage.artifacts.file_sha256
    monkeypatch.setattr(villa.storage.artifacts, "file_sha256", lambda p: calls.append(p) or real(p))
    enc = get_encoder("clip_rn50", clip_weights=str(path))
    assert enc.has_text_tower
    assert enc.config["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert get_encoder("clip_rn50", clip_weights=str(path)).config == enc.config and len(calls) == 1

    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    texts = ["a red circle", "two small stars"]
    with torch.no_grad():
        expected_images = model.encode_image(images)
        expected_texts = model.encode_text(open_clip.get_tokenizer("RN50-quickgelu")(texts))
        got_images = enc.build_image_model().visual(images)
    torch.testing.assert_close(got_images, expected_images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.encode_text(texts), expected_texts, rtol=1e-5, atol=1e-6)
