"""A clip_rn50 export holds a file open_clip loads as RN50-quickgelu, whose image embeddings are villa's."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_open_clip_loads_the_export_and_embeds_images_as_villa_does(tmp_path):
    import open_clip

    import villa
    from villa.datasets.vocabulary import Vocabulary
    from villa.encoders import get_encoder
    from villa.inference.model import Model

    torch.manual_seed(0)
    reference = open_clip.create_model("RN50-quickgelu", pretrained=None)  # random weights, no download
    weights = tmp_path / "rn50.pt"
    torch.save(reference.state_dict(), weights)
    del reference
    enc = get_encoder("clip_rn50", clip_weights=str(weights))
    tower = enc.build_image_model()
    with (
        torch.no_grad()
    ):  # stand-in for stage 2: the exported tower must be this one, not the initial weights
        for param in tower.visual.layer4.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model = Model(enc, tower, vocabulary=Vocabulary.from_names(["star", "circle"]), temperature=0.05,
                  source="test", info={"pairs": "villa"})  # fmt: skip
    out = villa.export_model(model, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"config.json", "open_clip_model.safetensors", "attributes.yaml",
                                               "MODEL_CARD.md"}  # fmt: skip
    assert "RN50-quickgelu" in (out / "MODEL_CARD.md").read_text()

    clip, _, preprocess = open_clip.create_model_and_transforms(
        "RN50-quickgelu", pretrained=str(out / "open_clip_model.safetensors")
    )
    clip.eval()
    images = torch.rand(2, 3, 224, 224)
    whole = torch.tensor([[0, 0, 0, 224, 224], [1, 0, 0, 224, 224]], dtype=torch.float32)
    with torch.no_grad():
        theirs = clip.encode_image(images)
        ours = tower(images, whole)
    assert theirs.shape == ours.shape == (2, 1024)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()
    assert float(clip.logit_scale.detach().exp()) == pytest.approx(1 / 0.05, rel=1e-5)

    # villa reads the same folder back: the trained tower, CLIP's own text tower, the vocabulary
    loaded = villa.load(out)
    assert loaded.encoder_name == "clip_rn50" and loaded.temperature == 0.05
    with torch.no_grad():
        assert torch.equal(loaded.image_model(images, whole), ours)
        text = torch.nn.functional.normalize(
            clip.encode_text(open_clip.get_tokenizer("RN50-quickgelu")(["a star"])), dim=1
        )
    assert torch.allclose(loaded.encode_text(["a star"]), text, atol=1e-5)
