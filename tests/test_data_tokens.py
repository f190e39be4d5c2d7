"""add_vlm_tokens on a bare tokenizer: special tokens stay single ids, pad and ChatML are added, idempotent."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlm.data.tokens import CHATML_TEMPLATE, IM_END, add_vlm_tokens, stop_token_ids, tile_tokens, vlm_special_tokens


def bare_tokenizer() -> PreTrainedTokenizerFast:
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(["image row col global start end pad"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>")


def test_tile_tokens_cover_every_grid() -> None:
    assert tile_tokens(1) == []
    assert tile_tokens(4) == ["<row_1_col_1>", "<row_1_col_2>", "<row_1_col_3>", "<row_1_col_4>",
                              "<row_2_col_1>", "<row_2_col_2>", "<row_3_col_1>", "<row_4_col_1>"]


def test_add_vlm_tokens_to_bare_tokenizer() -> None:
    tokenizer = bare_tokenizer()
    assert tokenizer.pad_token is None and not tokenizer.chat_template
    before = len(tokenizer)
    add_vlm_tokens(tokenizer, max_tiles=4)
    assert len(tokenizer) == before + len(vlm_special_tokens(4))
    for token in vlm_special_tokens(4):
        ids = tokenizer(f"x{token}y", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in ids and len(ids) == 3
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"  # an existing eos is kept
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    add_vlm_tokens(tokenizer, max_tiles=4)
    assert len(tokenizer) == before + len(vlm_special_tokens(4)), "second call must add nothing"
    # decoding for display drops the markers
    ids = tokenizer("<image><row_1_col_1>image", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "image"


def test_existing_chat_template_is_kept() -> None:
    tokenizer = bare_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    add_vlm_tokens(tokenizer)
    assert tokenizer.chat_template.startswith("{% for m in messages %}{{ m['content'] }}")
