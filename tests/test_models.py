"""The model layer: splicing image features, the prefix mask, projectors, and the model directory round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm.models.projectors import GITProjector, LinearProjector, MLPProjector, PixelShuffleProjector
from vlm.models.vlm import VisionLanguageModel

CONF = Path(__file__).resolve().parents[1] / "conf"
WORDS = ["<unk>", "<pad>", "<image>", "a", "red", "blue", "circle", "square", "is", "the", "what", "colour", "?"]


def make_tokenizer():
    """A word-level tokenizer with `<image>` as a single special token (the data layer's builder is not needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


def tiny_config(attention: str = "causal", projector: str = "MLPProjector", **projector_kwargs) -> dict:
    """16x16 images, 4x4 patches: 16 tokens per image (4 with pixel shuffle)."""
    return {
        "encoder": {"_target_": "vlm.models.encoders.timm_vit.TimmEncoder", "model_name": "vit_tiny_patch16_224",
                    "image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "projector": {"_target_": f"vlm.models.projectors.{projector}", "_partial_": True, **projector_kwargs},
        "decoder": {"_target_": "vlm.models.decoders.build_decoder", "pretrained": False,
                    "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                               "max_position_embeddings": 128, "vocab_size": 50, "tie_word_embeddings": True}},
        "attention": attention,
        "max_length": 64,
    }


def tiny_model(attention: str = "causal", **kwargs) -> tuple[VisionLanguageModel, object]:
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    return VisionLanguageModel.from_config(tiny_config(attention, **kwargs), tokenizer).eval(), tokenizer


def ids_with_images(model, tokenizer, pattern: list[str | int]) -> torch.Tensor:
    """`pattern` items: a word, or an int n = n images (tokens_per_image `<image>` tokens each)."""
    ids = []
    for item in pattern:
        if isinstance(item, int):
            ids += [model.image_token_id] * (item * model.tokens_per_image)
        else:
            ids.append(tokenizer.convert_tokens_to_ids(item))
    return torch.tensor([ids])


# ---- splicing -----------------------------------------------------------------------------------------------------
def test_from_config_resizes_vocabulary_and_finds_the_image_token() -> None:
    model, tokenizer = tiny_model()
    assert model.decoder.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.image_token_id == WORDS.index("<image>")
    assert model.tokens_per_image == 16
    assert model.config["max_length"] == 64


def test_random_decoder_gives_every_token_its_own_embedding() -> None:
    """Built from a config, the vocabulary is sized to the tokenizer at once: no rows share a resized-in mean."""
    tokenizer = make_tokenizer()
    cfg = tiny_config()
    cfg["decoder"]["config"]["vocab_size"] = 8  # a placeholder far below len(tokenizer)
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(cfg, tokenizer)
    emb = model.decoder.get_input_embeddings().weight.detach()
    assert emb.shape[0] == len(tokenizer)
    sim = torch.nn.functional.cosine_similarity(emb[:, None], emb[None], dim=-1)
    off_diagonal = sim[~torch.eye(len(emb), dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.9, "some rows start (nearly) identical"
    assert emb[8:].std() > 0.5 * emb[:8].std(), "rows beyond the placeholder vocabulary start near zero"


def test_two_images_land_at_their_placeholders_in_order() -> None:
    model, tokenizer = tiny_model()
    ids = ids_with_images(model, tokenizer, ["what", 1, "is", "a", 1, "?"])
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        embeds = model.embed(ids, pixels)[0]
        features = model.encode_images(pixels)
        text = model.decoder.get_input_embeddings()(ids.clamp(min=0))[0]
    slots = (ids[0] == model.image_token_id).nonzero().squeeze(-1)
    assert slots.numel() == 32
    torch.testing.assert_close(embeds[slots[:16]], features[0], rtol=0, atol=0)
    torch.testing.assert_close(embeds[slots[16:]], features[1], rtol=0, atol=0)
    textual = ids[0] != model.image_token_id
    torch.testing.assert_close(embeds[textual], text[textual], rtol=0, atol=0)
    assert not torch.equal(features[0], features[1])


def test_images_are_consumed_sample_after_sample() -> None:
    model, tokenizer = tiny_model()
    row = ids_with_images(model, tokenizer, ["a", 1, "circle"])
    ids = torch.cat([row, row])
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        features = model.encode_images(pixels)
    torch.testing.assert_close(embeds[0, 1:17], features[0])
    torch.testing.assert_close(embeds[1, 1:17], features[1])


def test_placeholder_count_mismatch_is_a_clear_error() -> None:
    model, tokenizer = tiny_model()
    ids = ids_with_images(model, tokenizer, ["a", 1, "circle"])
    with pytest.raises(ValueError, match=r"16 <image> tokens .* 32 features \(2 tiles x 16"):
        model.embed(ids, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="no pixel_values"):
        model.embed(ids)


def test_forward_gives_a_loss_and_passes_position_ids() -> None:
    model, tokenizer = tiny_model()
    ids = ids_with_images(model, tokenizer, ["a", 1, "red", "circle"])
    pixels = torch.randn(1, 3, 16, 16)
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), pixels, labels=labels)
        shifted = model(ids, torch.ones_like(ids), pixels, position_ids=torch.zeros_like(ids))
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert not torch.allclose(out.logits, shifted.logits)
    assert out.past_key_values is None  # training forward builds no KV cache unless asked


@pytest.mark.parametrize("masked_logits", [None, False])  # None: detect the boolean `logits_to_keep`
def test_next_token_loss_equals_the_full_logits_loss(masked_logits: bool | None) -> None:
    """Logits at the labelled positions only (or the fallback for decoders without a boolean `logits_to_keep`)
    give the same loss and the same gradients as Hugging Face's loss over the full logits."""
    model, tokenizer = tiny_model()
    model.train()
    row = ids_with_images(model, tokenizer, ["what", 1, "colour", "is", "the", "circle", "?", "red", "a"])[0]
    ids = torch.stack([row, row.roll(-3)])
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding in the second row
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]  # an answer at the end
    labels[1, 3:5] = ids[1, 3:5]  # and one in the middle
    pixels = torch.randn(2, 3, 16, 16)

    def loss_and_grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference, reference_grads = loss_and_grads(model(ids, mask, pixels, labels=labels).loss)
    model._masked_logits = masked_logits
    loss, grads = loss_and_grads(model.next_token_loss(ids, labels, mask, pixels))
    torch.testing.assert_close(loss, reference)
    assert model._masked_logits is (masked_logits is None)  # transformers' Llama takes the mask
    assert len(grads) == len(reference_grads)
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


# ---- attention masks ----------------------------------------------------------------------------------------------
def test_prefix_mask_exact_values() -> None:
    model, _ = tiny_model("prefix")
    t, i, p = 3, model.image_token_id, 1
    ids = torch.tensor([[t, i, i, t, i, t, p]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    allowed = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # the run 1-2 sees itself both ways
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],  # a second run of one token
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],  # padding column blocked
    ], dtype=torch.bool)
    bias = model.attention_bias(ids, mask)
    assert bias.shape == (1, 1, 7, 7) and bias.dtype == torch.float32
    expected = torch.zeros(7, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert torch.equal(bias[0, 0], expected)


def test_causal_attention_bias_is_the_padding_mask() -> None:
    model, _ = tiny_model("causal")
    ids = torch.tensor([[3, model.image_token_id, 4]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(model.attention_bias(ids, mask), mask)


def logits_after_changing_last_image_token(attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits before/after perturbing the embedding of the last image token, via a hooked image feature."""
    model, tokenizer = tiny_model(attention)
    ids = ids_with_images(model, tokenizer, ["what", 1, "is", "a"])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = model(ids, torch.ones_like(ids), pixels).logits[0]
        handle = model.projector.register_forward_hook(lambda m, a, out: out.index_add(
            1, torch.tensor([out.shape[1] - 1]), torch.ones_like(out[:, :1])))
        after = model(ids, torch.ones_like(ids), pixels).logits[0]
        handle.remove()
    return before, after


def test_causal_attention_is_causal_inside_images() -> None:
    before, after = logits_after_changing_last_image_token("causal")
    last_image = 16  # position of the last image token ("what" is 0)
    torch.testing.assert_close(before[:last_image], after[:last_image], rtol=0, atol=0)
    assert not torch.allclose(before[last_image:], after[last_image:])


def test_prefix_attention_is_bidirectional_inside_an_image_only() -> None:
    before, after = logits_after_changing_last_image_token("prefix")
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=0)  # text before the image stays causal
    assert not torch.allclose(before[1:16], after[1:16])  # earlier image tokens see the last one


def test_prefix_without_images_equals_causal_and_eager_equals_sdpa() -> None:
    torch.manual_seed(0)
    causal, tokenizer = tiny_model("causal")
    prefix, _ = tiny_model("prefix")
    prefix.load_state_dict(causal.state_dict())
    ids = torch.tensor([[3, 4, 5, 6, 7, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        a = causal(ids, mask).logits[0, :5]
        b = prefix(ids, mask).logits[0, :5]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    image_ids = ids_with_images(prefix, tokenizer, ["a", 1, "red"])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        sdpa = prefix(image_ids, torch.ones_like(image_ids), pixels).logits
        prefix.decoder.set_attn_implementation("eager")
        eager = prefix(image_ids, torch.ones_like(image_ids), pixels).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_unknown_attention_is_an_error() -> None:
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny_model("bidirectional")


# ---- projectors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "kwargs", "tokens"), [
    (LinearProjector, {}, 16),
    (MLPProjector, {}, 16),
    (GITProjector, {}, 16),
    (PixelShuffleProjector, {"factor": 2}, 4),
    (PixelShuffleProjector, {"factor": 4, "depth": 2}, 1),
])
def test_projector_shapes(cls, kwargs, tokens) -> None:
    projector = cls(24, 40, **kwargs)
    out = projector(torch.randn(2, 16, 24), (4, 4))
    assert out.shape == (2, tokens, 40)
    assert projector.num_tokens(16, (4, 4)) == tokens


def test_mlp2x_gelu_is_linear_gelu_linear() -> None:
    layers = list(MLPProjector(8, 16).proj)
    assert [type(m).__name__ for m in layers] == ["Linear", "GELU", "Linear"]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (8, 16, 16)


def test_pixel_shuffle_merges_neighbouring_patches() -> None:
    projector = PixelShuffleProjector(1, 4, factor=2)
    x = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid numbered row by row
    merged = projector.shuffle(x)
    assert merged.shape == (1, 4, 4)
    assert merged[0, 0].tolist() == [0, 1, 4, 5] and merged[0, 3].tolist() == [10, 11, 14, 15]


def test_pixel_shuffle_rejects_a_grid_it_cannot_divide() -> None:
    projector = PixelShuffleProjector(8, 8, factor=2)
    with pytest.raises(ValueError, match="does not divide"):
        projector.num_tokens(9, (3, 3))
    with pytest.raises(ValueError, match="drop_cls"):
        projector.num_tokens(17, (4, 4))


def test_pixel_shuffle_position_table_marks_where_each_token_sits() -> None:
    """`positions`: the same patch content gives a different token in every cell of the output grid, by exactly
    that cell's learned embedding; another grid size resamples the table (a picture at another resolution)."""
    projector = PixelShuffleProjector(4, 8, factor=2, positions=2)
    plain = PixelShuffleProjector(4, 8, factor=2)
    plain.proj.load_state_dict(projector.proj.state_dict())
    x = torch.ones(1, 16, 4)  # a 4x4 patch grid of identical patches -> 2x2 tokens
    out = projector(x, (4, 4))
    assert out.shape == (1, 4, 8)
    assert torch.allclose(out - plain(x, (4, 4)), projector.position.reshape(4, 8))
    assert len({tuple(row.tolist()) for row in out[0]}) == 4
    big = projector(torch.ones(1, 64, 4), (8, 8))  # a 4x4 token grid: the 2x2 table, resampled bilinearly
    assert big.shape == (1, 16, 8)
    table = projector.position_table(4, 4).reshape(4, 4, 8)
    assert torch.allclose(table.mean(dim=(0, 1)), projector.position.mean(dim=(0, 1)), atol=1e-6)
    assert torch.allclose(table[0, 0], projector.position[0, 0])  # the corner cells keep their embeddings
    assert projector.export_config() == {"type": "pixel_shuffle", "factor": 2, "depth": 1, "positions": 2}
    assert PixelShuffleProjector(4, 8).position is None


def test_model_with_a_position_table_round_trips(tmp_path: Path) -> None:
    model, tokenizer = tiny_model(projector="PixelShuffleProjector", factor=2, positions=2)
    ids = ids_with_images(model, tokenizer, ["where", 1, "circle"])
    pixels = torch.randn(1, 3, 16, 16)
    model.save_pretrained(tmp_path / "model", tokenizer)
    loaded, _ = VisionLanguageModel.from_pretrained(tmp_path / "model")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids, mask, pixels).logits, model.eval()(ids, mask, pixels).logits)
    assert torch.equal(loaded.projector.position, model.projector.position)


def test_model_with_pixel_shuffle_needs_fewer_placeholders() -> None:
    model, tokenizer = tiny_model(projector="PixelShuffleProjector", factor=2)
    assert model.tokens_per_image == 4
    ids = ids_with_images(model, tokenizer, ["a", 1, "circle"])
    with torch.no_grad():
        assert model(ids, torch.ones_like(ids), torch.randn(1, 3, 16, 16)).logits.shape[1] == 6


# ---- model directory ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_model_directory_round_trip(tmp_path: Path, attention: str) -> None:
    model, tokenizer = tiny_model(attention)
    ids = ids_with_images(model, tokenizer, ["what", 1, "is", "a", "circle"])
    mask, pixels = torch.ones_like(ids), torch.randn(1, 3, 16, 16)
    model.save_pretrained(tmp_path / "model", tokenizer)
    assert {"vlm.yaml", "model.safetensors"} <= {p.name for p in (tmp_path / "model").iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp directory left behind
    text = (tmp_path / "model" / "vlm.yaml").read_text()
    assert "pretrained: true" not in text and "init_from: null" in text

    loaded, loaded_tok = VisionLanguageModel.from_pretrained(tmp_path / "model")
    loaded.eval()
    with torch.no_grad():
        expected = model(ids, mask, pixels).logits
        got = loaded(ids, mask, pixels).logits
    assert torch.equal(got, expected)
    assert loaded.attention == attention and loaded.image_token_id == model.image_token_id
    assert loaded_tok is not None and loaded_tok.convert_tokens_to_ids("<image>") == model.image_token_id
    assert loaded.config["max_length"] == 64
    head = loaded.decoder.get_output_embeddings().weight
    assert head.data_ptr() == loaded.decoder.get_input_embeddings().weight.data_ptr()  # still tied


def test_saving_over_a_model_directory_replaces_it(tmp_path: Path) -> None:
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "model", tokenizer)
    (tmp_path / "model" / "stale.txt").write_text("old")
    with torch.no_grad():
        model.projector.proj[0].bias.fill_(0.5)
    model.save_pretrained(tmp_path / "model")  # without a tokenizer this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded, loaded_tok = VisionLanguageModel.from_pretrained(tmp_path / "model")
    assert loaded_tok is None and not (tmp_path / "model" / "stale.txt").exists()
    assert torch.all(loaded.projector.proj[0].bias == 0.5)


def test_loading_is_strict(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "model", tokenizer)
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    weights.pop(next(k for k in weights if k.startswith("projector.")))
    save_file(weights, str(tmp_path / "model" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="Missing key"):
        VisionLanguageModel.from_pretrained(tmp_path / "model")


def test_tiny_preset_composes_and_builds() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("summary", overrides=["model=tiny", "model/projector=pixel_shuffle"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert model_cfg["tokenizer"].endswith("shapes/tokenizer") and model_cfg["max_length"] == 256
    model = VisionLanguageModel.from_config(model_cfg, make_tokenizer())
    encoder, decoder = model_cfg["encoder"], model_cfg["decoder"]["config"]
    grid = encoder["image_size"] // encoder["patch_size"]
    assert model.encoder.num_tokens == grid**2
    assert model.tokens_per_image == grid**2 // model_cfg["projector"]["factor"] ** 2
    assert model.decoder.config.hidden_size == decoder["hidden_size"]
    assert model.decoder.config.num_hidden_layers == decoder["num_hidden_layers"]


def test_prefix_mask_follows_the_model_dtype() -> None:
    model, tokenizer = tiny_model("prefix")
    model.to(torch.bfloat16)
    ids = ids_with_images(model, tokenizer, ["a", 1, "red", "<pad>"])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    bias = model.attention_bias(ids, mask)
    assert bias.dtype == torch.bfloat16 and bias.min() == torch.finfo(torch.bfloat16).min
    with torch.no_grad():
        logits = model(ids, mask, torch.randn(1, 3, 16, 16)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
