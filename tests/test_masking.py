"""FLIP masking: exactly round((1-ratio)*N) patch tokens per sample, different subsets per sample, prefix tokens kept,
the selected tokens are the ones the blocks see, and evaluation is untouched - for timm, HF CLIP and HF SigLIP."""

from __future__ import annotations

import pytest
import torch

from vlm.models.encoders import HFVisionEncoder, TimmEncoder
from vlm.models.masking import keep_tokens, num_kept, random_keep

TINY_HF = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": 32, "patch_size": 8}


def timm_vit(**kwargs) -> TimmEncoder:
    torch.manual_seed(0)
    return TimmEncoder("vit_tiny_patch16_224", image_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                       **kwargs)


def hf(family: str) -> HFVisionEncoder:
    torch.manual_seed(0)
    return HFVisionEncoder(family, config=dict(TINY_HF))


ENCODERS = {
    "timm": lambda: timm_vit(),
    "timm_registers": lambda: timm_vit(reg_tokens=2),  # CLS + 2 registers: 3 prefix tokens
    "hf_clip": lambda: hf("clip"),
    "hf_siglip": lambda: hf("siglip"),  # no prefix token
}


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_random_keep_counts_and_subsets(ratio: float) -> None:
    n = 64
    keep = random_keep(16, n, ratio)
    k = round((1 - ratio) * n)
    assert num_kept(n, ratio) == k and keep.shape == (16, k)
    for row in keep:
        assert len(set(row.tolist())) == k and 0 <= int(row.min()) and int(row.max()) < n
        assert torch.equal(row, row.sort().values)
    if 0 < k < n:
        assert len({tuple(r.tolist()) for r in keep}) == 16  # a fresh subset per sample
    assert not torch.equal(random_keep(16, n, 0.5), random_keep(16, n, 0.5))  # and per call


def test_mask_ratio_range() -> None:
    assert num_kept(16, 0.9) == 2 and num_kept(5, 0.9) == 1
    for bad in (-0.1, 0.95, 1.0):
        with pytest.raises(ValueError, match="mask_ratio"):
            num_kept(64, bad)


def test_keep_tokens_keeps_prefix_then_selected() -> None:
    tokens = torch.arange(2 * 6).float().view(2, 6, 1)  # 2 prefix + 4 patches per sample
    out = keep_tokens(tokens, torch.tensor([[0, 3], [1, 2]]), num_prefix=2)
    assert out.squeeze(-1).tolist() == [[0, 1, 2, 5], [6, 7, 9, 10]]


@pytest.mark.parametrize("name", ENCODERS)
def test_training_keeps_exact_count_and_differs_per_sample(name: str) -> None:
    enc = ENCODERS[name]().train()
    rows, cols = enc.grid
    n, prefix = rows * cols, enc.num_prefix_tokens
    same = torch.randn(1, 3, 32, 32).expand(6, -1, -1, -1)  # six copies of one image
    for ratio in (0.5, 0.75):
        out = enc.forward_features(same, ratio)
        assert out.shape == (6, prefix + round((1 - ratio) * n), enc.hidden_size)
        # identical images, different kept subsets -> different features per sample
        flat = out.detach().flatten(1)
        assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 6))
    assert enc.forward_pooled(same, 0.75).shape == (6, enc.hidden_size)


@pytest.mark.parametrize("name", ENCODERS)
def test_evaluation_is_unmasked_and_matches_the_backbone(name: str) -> None:
    enc = ENCODERS[name]().eval()
    x = torch.randn(3, 3, 32, 32)
    rows, cols = enc.grid
    with torch.no_grad():
        masked_request = enc.forward_features(x, 0.75)
        plain = enc.forward_features(x)
        pooled = enc.forward_pooled(x, 0.75)
        if isinstance(enc, TimmEncoder):
            reference, reference_pooled = enc.model.forward_features(x), enc.model(x)
        else:
            out = enc.model(pixel_values=x)
            reference, reference_pooled = out.last_hidden_state, out.pooler_output
        vlm_tokens = enc(x)  # the VLM path (forward) is unchanged
    assert masked_request.shape[1] == enc.num_prefix_tokens + rows * cols
    torch.testing.assert_close(masked_request, plain)
    torch.testing.assert_close(plain, reference)
    torch.testing.assert_close(pooled, reference_pooled)
    assert vlm_tokens.shape == (3, rows * cols, enc.hidden_size)


@pytest.mark.parametrize("name", ENCODERS)
def test_blocks_see_exactly_the_kept_tokens(name: str) -> None:
    """Explicit keep indices: the output equals the backbone's blocks run on prefix + those embedded patches."""
    enc = ENCODERS[name]().eval()
    x = torch.randn(2, 3, 32, 32)
    rows, cols = enc.grid
    keep = random_keep(2, rows * cols, 0.5)
    p = enc.num_prefix_tokens
    with torch.no_grad():
        got = enc.forward_features(x, keep=keep)
        m = enc.model
        if isinstance(enc, TimmEncoder):
            h = m._pos_embed(m.patch_embed(x))
            h = torch.cat([h[:, :p], torch.stack([h[b, p:][keep[b]] for b in range(2)])], dim=1)
            expected = m.norm(m.blocks(m.norm_pre(h)))
        else:
            h = m.embeddings(x)
            h = torch.cat([h[:, :p], torch.stack([h[b, p:][keep[b]] for b in range(2)])], dim=1)
            if enc.family == "clip":
                h = m.pre_layrnorm(h)
            expected = m.encoder(inputs_embeds=h).last_hidden_state
            if enc.family == "siglip":
                expected = m.post_layernorm(expected)
    assert got.shape == (2, p + keep.shape[1], enc.hidden_size)
    torch.testing.assert_close(got, expected)


def test_masked_forward_trains_patch_and_position_embeddings() -> None:
    enc = timm_vit().train()
    x = torch.randn(4, 3, 32, 32)
    pooled = enc.forward_pooled(x, 0.75)
    (pooled * torch.randn_like(pooled)).sum().backward()  # (a plain sum of a layer-normed vector is constant)
    assert enc.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert enc.model.pos_embed.grad.abs().sum() > 0


def test_unmasked_tuning_phase_at_the_end() -> None:
    from vlm.stages.clip import ClipStage

    stage = ClipStage.__new__(ClipStage)  # the schedule alone, no model needed
    stage.mask_ratio, stage.unmasked_steps, stage.unmasked_share = 0.75, 0, 0.1
    assert [stage.mask_ratio_at(s, 100) for s in (0, 89, 90, 99)] == [0.75, 0.75, 0.0, 0.0]
    stage.unmasked_steps = 25
    assert [stage.mask_ratio_at(s, 100) for s in (74, 75)] == [0.75, 0.0]
    stage.unmasked_steps, stage.unmasked_share = 0, 0.0
    assert stage.mask_ratio_at(99, 100) == 0.75
