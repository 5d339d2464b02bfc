"""``clip_weights=openai``: open_clip's cache without network, a fast one-line failure offline; TorchScript trust."""

from __future__ import annotations

import hashlib
import socket
import time

import pytest
import torch

from villa.encoders import clip_rn50
from villa.encoders.clip_rn50 import fetch_openai_rn50, find_cached_openai_rn50
from villa.storage.errors import VillaError

HUB_REPO = "models--timm--resnet50_clip.openai"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """open_clip's two caches (Hub cache, ``~/.cache/clip``) moved into ``tmp_path``, empty; returns them."""
    from huggingface_hub import constants

    hub, home = tmp_path / "hub", tmp_path / "home"
    hub.mkdir()
    home.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HOME", str(home))
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return hub, home / ".cache" / "clip"


@pytest.fixture
def no_network(monkeypatch):
    """Any name lookup or connection fails as on a machine without network; returns the list of attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def fake_openai_cfg(monkeypatch, data: bytes) -> None:
    """open_clip's RN50/openai entry, with a URL carrying the SHA256 of ``data`` (as OpenAI's URLs do)."""
    sha = hashlib.sha256(data).hexdigest()
    cfg = {"url": f"https://openaipublic.azureedge.net/clip/models/{sha}/RN50.pt", "hf_hub": ""}
    monkeypatch.setattr(clip_rn50, "_openai_cfg", lambda: cfg)


def test_openai_weights_from_the_hub_cache_without_network(empty_caches, no_network, monkeypatch):
    """The Hub copy open_clip downloads for pretrained="openai" is found and handed to the loader."""
    hub, _ = empty_caches
    repo = hub / HUB_REPO
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    cached = repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stand-in for the 400 MB file")
    loaded = []
    monkeypatch.setattr(
        clip_rn50, "load_clip_rn50_weights", lambda path: (loaded.append(path), ({}, None))[1]
    )

    from villa.encoders import get_encoder

    enc = get_encoder("clip_rn50", clip_weights="openai")
    assert loaded == [cached.resolve()]
    assert enc.config["clip_weights"] == str(cached.resolve())
    assert no_network == [], "the cached path must not touch the network"


def test_openai_weights_from_the_url_cache_need_openais_checksum(empty_caches, no_network, monkeypatch):
    _, clip_cache = empty_caches
    clip_cache.mkdir(parents=True)
    (clip_cache / "RN50.pt").write_bytes(b"OpenAI's bytes")
    fake_openai_cfg(monkeypatch, b"OpenAI's bytes")
    assert find_cached_openai_rn50() == clip_cache / "RN50.pt"
    assert fetch_openai_rn50() == clip_cache / "RN50.pt"

    fake_openai_cfg(monkeypatch, b"other bytes")  # the file there is not OpenAI's
    assert find_cached_openai_rn50() is None
    with pytest.raises(VillaError, match="the file there now is not OpenAI's"):
        fetch_openai_rn50()
    assert no_network  # only the probe looked, and it failed at once


def test_offline_stops_at_once_with_one_line(empty_caches, no_network, monkeypatch):
    _, clip_cache = empty_caches
    import open_clip.pretrained

    def must_not_download(*args, **kwargs):
        raise AssertionError("no download attempt offline: open_clip's Hub download retries for ~45 s")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", must_not_download)
    started = time.perf_counter()
    with pytest.raises(VillaError) as info:
        fetch_openai_rn50()
    assert time.perf_counter() - started < 2
    message = str(info.value)
    assert "\n" not in message
    assert "no network" in message and "huggingface.co" in message
    assert "clip_weights=/path/to/RN50.pt" in message
    assert str(clip_cache / "RN50.pt") in message and "openaipublic.azureedge.net" in message

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VillaError, match="HF_HUB_OFFLINE is set"):
        fetch_openai_rn50()


def test_safetensors_files_are_read(tmp_path):
    """The Hub copy is a safetensors state dict: read as tensors (wrong layout -> the usual one line)."""
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(VillaError, match="holds no CLIP modified-ResNet weights"):
        clip_rn50.load_clip_rn50_weights(path)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_archive_warns_that_it_runs_code(tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    state = clip_rn50._read_file(path)
    assert set(state) == {"weight", "bias"}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "runs code stored in the file" in err and "trusted source" in err

    # OpenAI's published file (recognised by the SHA256 in its URL) loads quietly
    fake_openai_cfg(monkeypatch, path.read_bytes())
    clip_rn50._read_file(path)
    assert capsys.readouterr().err == ""
