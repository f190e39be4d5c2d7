"""Vision encoders: token counts, feature layers, CLS dropping, resolution changes, rebuilding, loading weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm.models.encoders import HFVisionEncoder, TimmEncoder, resample_positions
from vlm.models.encoders.hf import CLIP_MEAN
from vlm.models.registry import build

TINY_HF = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
           "image_size": 32, "patch_size": 8}


def tiny_vit(**kwargs) -> TimmEncoder:
    """The `tiny_vit` preset's shape: 32 px, 4 px patches -> 8x8 grid, 64 tokens."""
    torch.manual_seed(0)
    args = {"image_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, **kwargs}
    return TimmEncoder("vit_tiny_patch16_224", **args).eval()


def tiny_hf(family: str, **kwargs) -> HFVisionEncoder:
    torch.manual_seed(0)
    return HFVisionEncoder(family, config=dict(TINY_HF), **kwargs).eval()


# ---- timm ---------------------------------------------------------------------------------------------------------
def test_timm_tokens_and_cls() -> None:
    x = torch.randn(2, 3, 32, 32)
    enc = tiny_vit()
    assert (enc.hidden_size, enc.patch_size, enc.image_size, enc.grid, enc.num_tokens) == (96, 4, 32, (8, 8), 64)
    with_cls = tiny_vit(drop_cls=False)
    assert with_cls.num_tokens == 65
    with torch.no_grad():
        out, full = enc(x), with_cls(x)
        reference = enc.model.forward_features(x)
    assert out.shape == (2, 64, 96) and full.shape == (2, 65, 96)
    torch.testing.assert_close(full, reference)  # last layer = forward_features, CLS first
    torch.testing.assert_close(out, reference[:, 1:])


def test_timm_feature_layer() -> None:
    x = torch.randn(1, 3, 32, 32)
    enc = tiny_vit(feature_layer=-2)
    m = enc.model
    with torch.no_grad():
        h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for block in m.blocks[:-1]:
            h = block(h)
        torch.testing.assert_close(enc(x), h[:, 1:])
    with pytest.raises(ValueError, match="feature_layer"):
        tiny_vit(feature_layer=-5)


def test_timm_resolution_change() -> None:
    enc = tiny_vit()
    enc.set_image_size(48)
    assert enc.image_size == 48 and enc.grid == (12, 12) and enc.num_tokens == 144
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 144, 96)
    enc.set_image_size(50)  # not a multiple of 4: the patch conv floors, like SigLIP so400m/14 at 384 px
    assert enc.grid == (12, 12)
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 50, 50)).shape == (1, 144, 96)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        enc.set_image_size(2)


def test_timm_normalisation_follows_pretrained_cfg() -> None:
    enc = tiny_vit()
    assert enc.image_mean == tuple(enc.model.pretrained_cfg["mean"]) and len(enc.image_std) == 3


def test_timm_export_config_rebuilds_same_shapes() -> None:
    enc = tiny_vit()
    enc.set_image_size(48)
    spec = enc.export_config()
    assert spec["pretrained"] is False and spec["init_from"] is None and spec["image_size"] == 48
    assert spec["type"] == "timm_vit"
    rebuilt = build("encoder", spec, "encoder")
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    rebuilt.load_state_dict(enc.state_dict())
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), enc(x))


# ---- Hugging Face CLIP / SigLIP -----------------------------------------------------------------------------------
def test_hf_clip_tokens_layers_and_cls() -> None:
    x = torch.randn(2, 3, 32, 32)
    enc = tiny_hf("clip")
    assert (enc.grid, enc.num_tokens, enc.hidden_size, enc.image_mean) == ((4, 4), 16, 32, CLIP_MEAN)
    with torch.no_grad():
        ref = enc.model(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(enc(x), ref.last_hidden_state[:, 1:])
        keep = tiny_hf("clip", drop_cls=False)
        assert keep.num_tokens == 17 and keep(x).shape == (2, 17, 32)
        penultimate = tiny_hf("clip", feature_layer=-2)
        torch.testing.assert_close(penultimate(x), ref.hidden_states[-2][:, 1:])
        first_block = tiny_hf("clip", feature_layer=0)
        torch.testing.assert_close(first_block(x), ref.hidden_states[1][:, 1:])
    assert not torch.allclose(ref.hidden_states[-2], ref.last_hidden_state)


def test_hf_siglip_has_no_cls() -> None:
    x = torch.randn(2, 3, 32, 32)
    enc = tiny_hf("siglip")
    keep = tiny_hf("siglip", drop_cls=False)
    assert enc.num_tokens == keep.num_tokens == 16 and enc.image_mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc.model(pixel_values=x).last_hidden_state)
        assert keep(x).shape == (2, 16, 32)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_resolution_change(family: str) -> None:
    enc = tiny_hf(family)
    enc.set_image_size(48)
    assert enc.num_tokens == 36
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)
    rebuilt = build("encoder", enc.export_config(), "encoder")
    assert rebuilt.image_size == 48 and rebuilt.num_tokens == 36


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown encoder family 'dino'.*\['clip', 'siglip'\]"):
        HFVisionEncoder("dino", config=dict(TINY_HF))


def test_hf_from_pretrained_by_local_path(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    original = CLIPVisionModel(CLIPVisionConfig(**TINY_HF)).eval()
    original.save_pretrained(tmp_path / "clip")
    enc = HFVisionEncoder("clip", name_or_path=str(tmp_path / "clip"), pretrained=True, feature_layer=-2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = original(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(enc(x), expected)
    spec = enc.export_config()
    assert spec["pretrained"] is False and spec["config"]["num_hidden_layers"] == 3
    assert spec["name_or_path"] == str(tmp_path / "clip")


# ---- init_from ----------------------------------------------------------------------------------------------------
def save_encoder(encoder: torch.nn.Module, directory: Path) -> Path:
    """A model directory as any stage writes it: `encoder.*` keys in model.safetensors (plus other parts)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    state = {f"encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    state["text_encoder.proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(directory / "model.safetensors"))
    return directory


def test_init_from_loads_encoder_weights(tmp_path: Path) -> None:
    source = tiny_vit()
    directory = save_encoder(source, tmp_path / "clip-run")
    torch.manual_seed(123)
    target = TimmEncoder("vit_tiny_patch16_224", image_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                         init_from=str(directory))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    by_file = HFVisionEncoder("clip", config=dict(TINY_HF),
                              init_from=str(save_encoder(tiny_hf("clip"), tmp_path / "hf") / "model.safetensors"))
    assert torch.equal(by_file.model.embeddings.patch_embedding.weight,
                       tiny_hf("clip").model.embeddings.patch_embedding.weight)


def test_init_from_resamples_position_embeddings(tmp_path: Path) -> None:
    source = tiny_vit()
    directory = save_encoder(source, tmp_path / "run")
    target = tiny_vit(image_size=48, init_from=str(directory))
    assert target.model.pos_embed.shape == (1, 145, 96)
    torch.testing.assert_close(target.model.pos_embed[:, :1], source.model.pos_embed[:, :1])  # CLS row kept
    assert torch.equal(target.model.blocks[0].attn.qkv.weight, source.model.blocks[0].attn.qkv.weight)


def test_init_from_rejects_other_shapes(tmp_path: Path) -> None:
    directory = save_encoder(tiny_vit(), tmp_path / "run")
    with pytest.raises(ValueError, match="does not fit"):
        tiny_vit(embed_dim=48, init_from=str(directory))
    with pytest.raises(FileNotFoundError):
        tiny_vit(init_from=str(tmp_path / "nowhere"))


def test_resample_positions() -> None:
    table = torch.randn(1 + 16, 8)
    assert torch.equal(resample_positions(table, 17, 1), table)
    constant = torch.ones(1, 16, 8)
    torch.testing.assert_close(resample_positions(constant, 36, 0), torch.ones(1, 36, 8))
    with pytest.raises(ValueError, match="not square"):
        resample_positions(table, 20, 1)
