"""Encoders: registry, default towers (offline, deterministic), the RoIAlign recipe, clip_rn50 loading."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from villa.encoders import boxes_with_batch_index, get_encoder, registered_names
from villa.encoders.clip_resnet import (
    RegionImageEncoder,
    attention_pool_first_token,
    build_modified_resnet,
    seeded_modified_resnet,
)
from villa.encoders.clip_rn50 import RN50_DIM, RN50_LAYERS, RN50_WIDTH, rn50_visual_shapes
from villa.encoders.text import minilm_folder
from villa.storage.errors import VillaError


@pytest.fixture(scope="module")
def default_encoder():
    return get_encoder("default", device="cpu")


def random_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """A random state dict with the given key -> shape (BatchNorm variances kept positive)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(shape, generator=gen) * 0.02
    return out


def grid_boxes(cells) -> torch.Tensor:
    return torch.tensor([[28 * (c % 3), 28 * (c // 3), 28 * (c % 3) + 28, 28 * (c // 3) + 28] for c in cells])


# --------------------------------------------------------------------------- registry
def test_registry_lists_and_rejects():
    assert {"default", "clip_rn50", "hf:<...>"} <= set(registered_names())
    with pytest.raises(VillaError, match="unknown encoder 'clip_vit'.*default"):
        get_encoder("clip_vit")


def test_hf_folder_encoder(default_encoder):
    enc = get_encoder(f"hf:{minilm_folder()}")
    assert enc.name.startswith("hf:") and enc.dim == 384
    torch.testing.assert_close(
        enc.encode_text(["the color is red"]), default_encoder.encode_text(["the color is red"])
    )
    with pytest.raises(VillaError, match="no Hugging Face model"):
        get_encoder("hf:/no/such/folder")


def test_hf_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    enc = get_encoder(f"hf:{tmp_path}")  # cheap: the weights load on first use
    assert enc.dim == 32 and enc.build_image_model().output_dim == 32
    with pytest.raises(VillaError, match="cannot load the text model"):
        enc.encode_text(["the color is red"])


# --------------------------------------------------------------------------- default encoder
def test_text_tower_batches_by_the_device_default(default_encoder, monkeypatch):
    """On a CPU the tower runs TEXT_BATCH_CPU texts per forward unless told otherwise; rows keep their order."""
    from villa.encoders.text import TEXT_BATCH_CPU

    tower = default_encoder.text
    tower.encode(["warm up"])
    sizes = []
    real = tower._tokenizer

    def counting(batch, **kwargs):
        sizes.append(len(batch))
        return real(batch, **kwargs)

    monkeypatch.setattr(tower, "_tokenizer", counting)
    texts = [f"the number is {i}" + " and more" * (i % 3) for i in range(2 * TEXT_BATCH_CPU + 3)]
    embs = default_encoder.encode_text(texts)
    assert sizes == [TEXT_BATCH_CPU, TEXT_BATCH_CPU, 3]
    sizes.clear()
    torch.testing.assert_close(
        default_encoder.encode_text(texts, batch_size=1000), embs, atol=1e-5, rtol=1e-4
    )
    assert sizes == [len(texts)]


def test_default_text_tower(default_encoder):
    texts = ["the color is red", "the image is red", "the number is a nine"]
    embs = default_encoder.encode_text(texts, batch_size=2)
    assert embs.shape == (3, 384) and embs.dtype == torch.float32
    assert not torch.allclose(embs.norm(dim=1), torch.ones(3))  # the API returns raw (unnormalised) vectors
    unit = torch.nn.functional.normalize(embs, dim=1)
    assert unit[0] @ unit[1] > unit[0] @ unit[2]  # paraphrases closer than different attributes
    # padding in a batch must not change a sentence's embedding (mean over the attention mask)
    torch.testing.assert_close(default_encoder.encode_text(texts[2:]), embs[2:], atol=1e-5, rtol=1e-4)
    assert default_encoder.encode_text([]).shape == (0, 384)
    weight = torch.ones(384, requires_grad=True)
    (embs @ weight).sum().backward()  # usable as a constant in a training graph (not an inference tensor)
    assert weight.grad is not None and not embs.requires_grad


def test_default_image_tower_deterministic(default_encoder):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = default_encoder.build_image_model().state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG is untouched
    second = default_encoder.build_image_model().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = seeded_modified_resnet((1, 1, 1, 1), 16, 384, seed=1).state_dict()
    assert not torch.equal(other["conv1.weight"], first["visual.conv1.weight"])
    assert first["visual.layer4.0.bn3.weight"].eq(1).all()  # residual branches active when untrained
    assert default_encoder.build_image_model().output_dim == default_encoder.dim == 384


def test_default_encoder_config_is_json(default_encoder):
    import json

    config = json.loads(json.dumps(default_encoder.config))
    assert config["name"] == "default" and config["image_layers"] == [1, 1, 1, 1] and config["dim"] == 384


# --------------------------------------------------------------------------- region recipe
def test_attention_pool_matches_open_clip():
    torch.manual_seed(0)
    visual = build_modified_resnet((1, 1, 1, 1), 16, 48).eval()
    x = torch.randn(5, 512, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(
            attention_pool_first_token(visual.attnpool, x), visual.attnpool(x), atol=1e-5, rtol=1e-4
        )


def test_region_recipe_and_batching(default_encoder):
    model = default_encoder.build_image_model()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 84, 84, generator=gen)
    per_image = [grid_boxes([0, 4]), grid_boxes([1, 2, 3, 8]), grid_boxes([5])]
    boxes = boxes_with_batch_index(per_image)
    assert boxes.shape == (7, 5) and boxes[:, 0].tolist() == [0, 0, 1, 1, 1, 1, 2]
    with torch.inference_mode():
        batched = model(images, boxes)
        # the recipe spelled out with open_clip's own modules
        v = model.visual
        feats = v.layer3(v.layer2(v.layer1(v.stem(images))))
        rois = roi_align(
            feats, boxes, (14, 14), spatial_scale=feats.shape[-1] / 84, sampling_ratio=0, aligned=True
        )
        reference = v.attnpool(v.layer4(rois))
        alone = [model(images[i : i + 1], boxes_with_batch_index([b])) for i, b in enumerate(per_image)]
    assert batched.shape == (7, 384)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], batched[1])  # different regions, different embeddings
    assert model(images, torch.zeros(0, 5)).shape == (0, 384)


def test_region_encoder_trains(default_encoder):
    """Stage 2 fine-tunes the tower: gradients reach the stem through RoIAlign."""
    model = default_encoder.build_image_model().train()
    out = model(torch.rand(2, 3, 84, 84), boxes_with_batch_index([grid_boxes([0]), grid_boxes([4, 8])]))
    out.pow(2).sum().backward()
    assert model.visual.conv1.weight.grad is not None and model.visual.conv1.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- clip_rn50
@pytest.fixture(scope="module")
def rn50_visual_state():
    return random_state(rn50_visual_shapes(), seed=0)


@pytest.mark.parametrize("layout", ["bare", "visual_prefix"])
def test_clip_rn50_visual_only(layout, rn50_visual_state, tmp_path):
    prefix = "" if layout == "bare" else "visual."
    path = tmp_path / "clip.pth"
    torch.save({prefix + k: v for k, v in rn50_visual_state.items()}, path)
    enc = get_encoder("clip_rn50", clip_weights=str(path))
    assert enc.name == "clip_rn50" and enc.dim == RN50_DIM and not enc.has_text_tower
    model = enc.build_image_model()
    assert isinstance(model, RegionImageEncoder)
    assert torch.equal(model.visual.layer4[2].conv3.weight, rn50_visual_state["layer4.2.conv3.weight"])
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 84, 84), boxes_with_batch_index([grid_boxes([0, 4])]))
    assert out.shape == (2, RN50_DIM) and torch.isfinite(out).all()
    with pytest.raises(VillaError, match="only CLIP's visual tower"):
        enc.encode_text(["the color is red"])


def test_clip_rn50_wrong_keys(rn50_visual_state, tmp_path):
    state = dict(rn50_visual_state)
    state["attnpool.c_proj.weight"] = torch.zeros(512, 2048)  # a different output dim
    torch.save(state, tmp_path / "wrong_shape.pth")
    with pytest.raises(VillaError, match="wrong shapes.*attnpool.c_proj.weight"):
        get_encoder("clip_rn50", clip_weights=str(tmp_path / "wrong_shape.pth"))
    del state["attnpool.c_proj.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(VillaError, match="1 missing"):
        get_encoder("clip_rn50", clip_weights=str(tmp_path / "missing.pth"))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(VillaError, match="no CLIP modified-ResNet weights"):
        get_encoder("clip_rn50", clip_weights=str(tmp_path / "resnet.pth"))
    with pytest.raises(VillaError, match="needs --clip_weights"):
        get_encoder("clip_rn50")


def test_clip_rn50_layout_is_open_clips():
    """The keys we accept are exactly open_clip's CLIP RN50 (= OpenAI's layout) minus logit_scale."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from villa.encoders.clip_rn50 import RN50_TEXT, _build_text_tower

    with torch.device("meta"):
        vision = CLIPVisionCfg(layers=RN50_LAYERS, width=RN50_WIDTH, image_size=224)
        reference = CLIP(RN50_DIM, vision, CLIPTextCfg(**RN50_TEXT), quick_gelu=True).state_dict()
        text = _build_text_tower().state_dict()
    ours = {
        **{f"visual.{k}": s for k, s in rn50_visual_shapes().items()},
        **{k: v.shape for k, v in text.items()},
    }
    assert set(reference) - set(ours) == {"logit_scale"}
    assert all(reference[k].shape == shape for k, shape in ours.items())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_clip_rn50_full_checkpoint_and_torchscript(rn50_visual_state, tmp_path):
    """Full CLIP state dict (nested, "module." prefix, OpenAI metadata keys, fp16) and a TorchScript archive."""
    from villa.encoders.clip_rn50 import _build_text_tower

    with torch.device("meta"):
        text_shapes = {k: v.shape for k, v in _build_text_tower().state_dict().items()}
    state = {
        **{f"visual.{k}": v for k, v in rn50_visual_state.items()},
        **random_state(text_shapes, seed=1),
        "logit_scale": torch.tensor(4.6),
        "input_resolution": torch.tensor(224),
    }
    state = {k: (v.half() if k.startswith("transformer.") else v) for k, v in state.items()}
    path = tmp_path / "clip_full.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    enc = get_encoder("clip_rn50", clip_weights=str(path))
    assert enc.has_text_tower and enc.config["has_text_tower"]
    embs = enc.encode_text(["the color is red", "there is a circle", "the shape is small"], batch_size=2)
    assert embs.shape == (3, RN50_DIM) and torch.isfinite(embs).all()
    assert not torch.allclose(embs[0], embs[1])
    assert torch.equal(enc.build_image_model().visual.conv1.weight, rn50_visual_state["conv1.weight"])

    # a TorchScript archive (the OpenAI RN50.pt format), here holding the visual tower only
    visual = build_modified_resnet(RN50_LAYERS, RN50_WIDTH, RN50_DIM)
    visual.load_state_dict(rn50_visual_state)
    torch.jit.save(torch.jit.script(visual), tmp_path / "RN50_visual_jit.pt")
    jit_enc = get_encoder("clip_rn50", clip_weights=str(tmp_path / "RN50_visual_jit.pt"))
    assert torch.equal(jit_enc.build_image_model().visual.conv1.weight, rn50_visual_state["conv1.weight"])


# --------------------------------------------------------------------------- rich (stage-1) region features
def test_rich_features_deterministic_and_shaped(default_encoder):
    """Same seed -> same bytes; another seed -> other features; the global RNG is untouched; the
    ``reference`` block is exactly the reference recipe (before its fixed projection)."""
    from villa.encoders.rich import BLOCK_DIM, BLOCKS, RichRegionFeatures

    gen = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 84, 84, generator=gen)
    boxes = boxes_with_batch_index([grid_boxes([0, 4]), grid_boxes([8])])
    torch.manual_seed(7)
    expected_next = torch.rand(2)
    torch.manual_seed(7)
    a = RichRegionFeatures(default_encoder.build_image_model(), 384, seed=0)
    assert torch.equal(torch.rand(2), expected_next)
    b = RichRegionFeatures(default_encoder.build_image_model(), 384, seed=0)
    c = RichRegionFeatures(default_encoder.build_image_model(), 384, seed=1)
    with torch.inference_mode():
        ra, rb, rc = a(images, boxes), b(images, boxes), c(images, boxes)
        reference = a.tower(images, boxes)
        mean, std = a.fit_stats(ra)
        out = a.finalize(ra, mean, std)
    assert ra.shape == (3, len(BLOCKS) * BLOCK_DIM) and out.shape == (3, 384)
    assert ra.numpy().tobytes() == rb.numpy().tobytes()
    assert not torch.allclose(ra, rc)
    torch.testing.assert_close(ra[:, :BLOCK_DIM], reference @ a.proj_reference)
    torch.testing.assert_close(out, ((ra - mean) / std) @ a.proj_out)
    assert a(images, boxes[:0]).shape == (0, len(BLOCKS) * BLOCK_DIM)


def test_rich_features_ignore_autocast(default_encoder):
    """The rich descriptor is z-scored downstream, so it must stay exact float32 under mixed precision:
    a bf16 autocast region around it changes nothing (on an H100, bf16 gave a relative error of 0.52)."""
    from villa.encoders.rich import RichRegionFeatures

    images = torch.rand(2, 3, 84, 84, generator=torch.Generator().manual_seed(5))
    boxes = boxes_with_batch_index([grid_boxes([0, 4]), grid_boxes([8])])
    rich = RichRegionFeatures(default_encoder.build_image_model(), 384, seed=0)
    with torch.inference_mode():
        exact = rich(images, boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = rich(images, boxes)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, exact)


def test_stage2_tower_is_reference_recipe(default_encoder):
    """Rich features are preprocessing-only: the stage-2 trainable tower is still the plain recipe."""
    assert default_encoder.default_region_features == "rich"
    assert type(default_encoder.build_image_model()) is RegionImageEncoder
