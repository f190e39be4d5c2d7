"""Generation: the KV cache changes nothing, left-padded batches equal one-by-one, beam width 1 is greedy, and our
beam search agrees with Hugging Face's on the same decoder and embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.evaluation.generation import beam_search, generate


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two when other tests share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vlm(tokenizer_dir: Path, attention: str = "causal", seed: int = 0):
    """A random 2-layer model on the shapes tokenizer: 16x16 images, 16 tokens per image."""
    from transformers import AutoTokenizer

    from vlm.models.vlm import VisionLanguageModel

    config = {
        "encoder": {"_target_": "vlm.models.encoders.timm_vit.TimmEncoder", "model_name": "vit_tiny_patch16_224",
                    "pretrained": False, "image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                    "num_heads": 2},
        "projector": {"_target_": "vlm.models.projectors.MLPProjector", "_partial_": True},
        "decoder": {"_target_": "vlm.models.decoders.build_decoder", "pretrained": False,
                    "config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "max_position_embeddings": 256, "vocab_size": 64}},
        "attention": attention,
        "max_length": 128,
    }
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = VisionLanguageModel.from_config(config, tokenizer).eval()
    with torch.no_grad():
        # resizing to the tokenizer gives every new row (nearly) the mean embedding: give each token its own
        model.decoder.get_input_embeddings().weight.normal_(0.0, 1.0)
        # a sharper random LM: greedy choices are far from ties, so float noise cannot flip them
        model.decoder.get_output_embeddings().weight.mul_(8.0)
    return model, tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(make_shapes) -> Path:
    return make_shapes(num_train=8, num_val=2, num_test=2, samples_per_shard=8) / "tokenizer"


def prompts(model, tokenizer, questions: list[str]) -> dict:
    """A left-padded batch of image questions of different lengths."""
    from vlm.data.collate import Collator
    from vlm.data.formats import Record
    from vlm.loading import build_processor

    processor = build_processor(model, tokenizer)
    records = [Record(messages=[{"role": "user", "content": f"<image>\n{q}"}],
                      images=[Image.new("RGB", (20, 20), (40 * i, 200 - 30 * i, 90))]) for i, q in enumerate(questions)]
    return Collator(tokenizer.pad_token_id, padding_side="left")([processor.prompt(r) for r in records])


QUESTIONS = ["what color is the circle?", "how many shapes are there in this picture?", "where?"]


@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_cache_equals_recomputing_token_for_token(tokenizer_dir: Path, attention: str) -> None:
    model, tokenizer = tiny_vlm(tokenizer_dir, attention)
    batch = prompts(model, tokenizer, QUESTIONS)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    cached = generate(*args, max_new_tokens=12, use_cache=True)
    recomputed = generate(*args, max_new_tokens=12, use_cache=False)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, recomputed)
    assert len(set(cached.flatten().tolist())) > 1  # not a degenerate constant output


@pytest.mark.parametrize("attention", ["causal", "prefix"])
def test_left_padded_batch_equals_one_by_one(tokenizer_dir: Path, attention: str) -> None:
    model, tokenizer = tiny_vlm(tokenizer_dir, attention)
    batch = prompts(model, tokenizer, QUESTIONS)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    together = generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=10)
    for i, question in enumerate(QUESTIONS):
        single = prompts(model, tokenizer, [question])
        single["pixel_values"] = batch["pixel_values"][i : i + 1]
        alone = generate(model, single["input_ids"], single["attention_mask"], single["pixel_values"],
                         max_new_tokens=10)
        assert torch.equal(alone[0], together[i])


def test_stops_at_the_end_token_and_pads_after_it(tokenizer_dir: Path) -> None:
    model, tokenizer = tiny_vlm(tokenizer_dir)
    batch = prompts(model, tokenizer, QUESTIONS)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    free = generate(*args, max_new_tokens=8)
    row = free[0].tolist()
    k = next(i for i in range(1, 8) if row[i] not in row[:i])  # row 0 says this first at step k + 1
    stop, pad = row[k], tokenizer.pad_token_id
    assert pad not in row
    out = generate(*args, max_new_tokens=8, eos_token_ids=[stop], pad_token_id=pad)
    assert torch.equal(out[0, : k + 1], free[0, : k + 1]) and (out[0, k + 1 :] == pad).all()
    for row in range(3):
        ends = (free[row] == stop).nonzero()
        if len(ends) == 0:
            assert torch.equal(out[row], free[row, : out.shape[1]])


def test_beam_width_one_is_greedy(tokenizer_dir: Path) -> None:
    model, tokenizer = tiny_vlm(tokenizer_dir)
    batch = prompts(model, tokenizer, QUESTIONS)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    greedy = generate(*args, max_new_tokens=8)
    assert torch.equal(beam_search(*args, num_beams=1, max_new_tokens=8), greedy)
    stop = int(greedy[1, 4])
    greedy_eos = generate(*args, max_new_tokens=8, eos_token_ids=[stop], pad_token_id=0)
    beam_eos = beam_search(*args, num_beams=1, max_new_tokens=8, eos_token_ids=[stop], pad_token_id=0)
    assert torch.equal(beam_eos, greedy_eos[:, : beam_eos.shape[1]])
    assert (greedy_eos[:, beam_eos.shape[1] :] == 0).all()
    assert (beam_eos[1] == stop).any()  # the end token did end row 1


def test_beam_search_matches_hugging_face_on_the_same_embeddings(tokenizer_dir: Path) -> None:
    model, tokenizer = tiny_vlm(tokenizer_dir)
    batch = prompts(model, tokenizer, QUESTIONS[:1])
    ours = beam_search(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], num_beams=3,
                       max_new_tokens=6)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        theirs = model.decoder.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], num_beams=3,
                                        do_sample=False, max_new_tokens=6, min_new_tokens=6, early_stopping=True,
                                        eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    assert ours.shape == (1, 6) and torch.equal(ours, theirs)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tokenizer_dir: Path) -> None:
    model, tokenizer = tiny_vlm(tokenizer_dir)
    batch = prompts(model, tokenizer, QUESTIONS)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    a = generate(*args, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(*args, max_new_tokens=6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    nucleus = generate(*args, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                       generator=torch.Generator().manual_seed(2))
    assert torch.equal(nucleus, generate(*args, max_new_tokens=6))


def test_right_padding_is_refused(tokenizer_dir: Path) -> None:
    model, _ = tiny_vlm(tokenizer_dir)
    ids = torch.tensor([[5, 6, 7], [5, 6, 0]])
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="left padding"):
        beam_search(model, ids, torch.tensor([[1, 1, 1], [1, 1, 0]]))
