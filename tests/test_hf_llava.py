"""The Hugging Face bridge: export to transformers' Llava, import from it, the processors, and the chat templates.

Every model here is tiny and random, built from configs and saved to temporary directories (nothing is downloaded).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.data.formats import Record
from vlm.data.processor import IGNORE_INDEX
from vlm.data.tokens import add_vlm_tokens
from vlm.interop.llava import NotMappableError, export_llava, import_llava, llava_problems
from vlm.loading import build_processor, load_model
from vlm.models.decoders import build_decoder
from vlm.models.encoders.hf import HFVisionEncoder
from vlm.models.projectors import MLPProjector
from vlm.models.vlm import VisionLanguageModel, image_token_id_of

SPECIAL = ["<pad>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["A chat between a curious human and an artificial intelligence assistant.",
         "USER: what colour is the circle? ASSISTANT: a red circle", "where is it? at the top left"]
VISION = {"clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       image_size=32, patch_size=8),
          "siglip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         image_size=32, patch_size=8)}


def make_tokenizer(chat_template: str = "llava_v1", llama_like: bool = False):
    """Byte-level BPE (any text encodes, Qwen-like: no BOS added) with `<image>`, BOS and EOS; or, `llama_like`,
    Metaspace BPE whose encoding starts with BOS (Llama's and Vicuna's kind)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if llama_like:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", *SPECIAL], show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer)
    if llama_like:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        assert tok.token_to_id("<s>") == 2
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>" if llama_like else None)
    return add_vlm_tokens(tokenizer, chat_template=chat_template)


def text_config(vocab: int, tie: bool = False) -> dict:
    return dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, vocab_size=vocab, tie_word_embeddings=tie)


def our_model(tokenizer, family: str = "clip", feature_layer: int = -2, drop_cls: bool = True,
              tie: bool = False, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    encoder = HFVisionEncoder(family, config=VISION[family], feature_layer=feature_layer, drop_cls=drop_cls)
    decoder = build_decoder(pretrained=False, config=text_config(len(tokenizer), tie))
    return VisionLanguageModel(encoder, MLPProjector(32, 32), decoder, image_token_id_of(tokenizer),
                               config={"max_length": 256}).eval()


def picture(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


ONE_TURN = [{"role": "user", "content": "<image>\nwhat colour is the circle?"}]
TWO_TURNS = [*ONE_TURN, {"role": "assistant", "content": "a red circle"},
             {"role": "user", "content": "where is it?"}]


def as_parts(messages: list[dict], image: Image.Image) -> list[dict]:
    """Our string messages in transformers' list-of-parts form (`<image>\\n` at the start -> an image part)."""
    out = []
    for m in messages:
        text = m["content"]
        parts = []
        if text.startswith("<image>\n"):
            parts.append({"type": "image", "image": image})
            text = text[len("<image>\n"):]
        out.append({"role": m["role"], "content": [*parts, {"type": "text", "text": text}]})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tokenizer = make_tokenizer()
    model = our_model(tokenizer)
    out = export_llava(model, tokenizer, tmp_path_factory.mktemp("export") / "llava")
    return model, tokenizer, out


def test_export_writes_transformers_own_layout(exported) -> None:
    import json

    from safetensors import safe_open

    model, _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_token_index"] == model.image_token_id and config["image_seq_length"] == 16
    assert config["projector_hidden_act"] == "gelu" and config["multimodal_projector_bias"] is True
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert config["text_config"]["model_type"] == "llama"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "lm_head"}
    assert {".".join(k.split(".")[:2]) for k in keys if k.startswith("model.")} == {
        "model.vision_tower", "model.multi_modal_projector", "model.language_model"}
    assert (out / "chat_template.jinja").read_text() == exported[1].chat_template


def test_export_same_logits_and_greedy_tokens(exported) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm.evaluation.generation import generate

    model, tokenizer, out = exported
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    hf_processor = AutoProcessor.from_pretrained(str(out))
    image = picture()
    prompt = build_processor(model, tokenizer).prompt(Record(messages=TWO_TURNS, images=[image]))
    inputs = hf_processor.apply_chat_template(as_parts(TWO_TURNS, image), add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt["input_ids"].tolist()
    ids, pixels = prompt["input_ids"][None], prompt["pixel_values"]
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels).logits
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        new = generate(model, ids, torch.ones_like(ids), pixels, max_new_tokens=12)
        hf_new = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             max_new_tokens=12, do_sample=False, eos_token_id=None)[:, ids.shape[1]:]
    assert new.tolist() == hf_new.tolist()


def test_export_at_an_interpolated_resolution(tmp_path: Path) -> None:
    """An encoder run at 48 px on a 32 px position table: the export holds the resampled table, same logits."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = make_tokenizer()
    model = our_model(tokenizer, family="clip", feature_layer=1, drop_cls=False)
    model.encoder.set_image_size(48)
    out = export_llava(model, tokenizer, tmp_path / "llava")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    assert hf.config.vision_config.image_size == 48 and hf.config.image_seq_length == 37
    prompt = build_processor(model, tokenizer).prompt(Record(messages=ONE_TURN, images=[picture(4)]))
    with torch.no_grad():
        ours = model(prompt["input_ids"][None], pixel_values=prompt["pixel_values"]).logits
        theirs = hf(input_ids=prompt["input_ids"][None], pixel_values=prompt["pixel_values"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("template", "llama_like"), [("llava_v1", False), ("chatml", False), ("llava_v1", True)])
def test_processors_give_the_same_ids(tmp_path: Path, template: str, llama_like: bool) -> None:
    from transformers import AutoProcessor

    tokenizer = make_tokenizer(template, llama_like)
    model = our_model(tokenizer)
    hf_processor = AutoProcessor.from_pretrained(str(export_llava(model, tokenizer, tmp_path / "llava")))
    ours = build_processor(model, tokenizer)
    image = picture(1)
    for messages in (ONE_TURN, TWO_TURNS):
        expected = ours.prompt(Record(messages=messages, images=[image]))
        # transformers' own path (lists of parts; it sees the template's BOS and adds none), then our plain strings
        got = hf_processor.apply_chat_template(as_parts(messages, image), add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        assert got["input_ids"][0].tolist() == expected["input_ids"].tolist(), (template, messages)
        text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
        got = hf_processor(images=[image], text=text, return_tensors="pt", add_special_tokens=False)
        assert got["input_ids"][0].tolist() == expected["input_ids"].tolist(), (template, messages)
        # PIL bicubic both ways; transformers' pipeline rounds differently by at most one 8-bit level
        assert (got["pixel_values"] - expected["pixel_values"]).abs().max() <= 1.01 / 255 / min(
            model.encoder.image_std)


def test_round_trip_keeps_every_weight(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    for tie in (False, True):
        model = our_model(tokenizer, tie=tie, seed=3)
        back, back_tokenizer = import_llava(export_llava(model, tokenizer, tmp_path / f"llava-{tie}"))
        assert back.training  # ready to train, like a freshly built model
        mine, theirs = model.state_dict(), back.state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key
        assert (back.encoder.feature_layer, back.encoder.drop_cls, back.image_token_id, back.tokens_per_image) == (
            -2, True, model.image_token_id, model.tokens_per_image)
        assert back_tokenizer.chat_template == tokenizer.chat_template
        assert back.decoder.config.tie_word_embeddings == tie


def hf_llava_dir(directory: Path, family: str, layer: int, strategy: str) -> Path:
    """A random transformers Llava model with a processor the way llava-hf ships one (list-only template)."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = make_tokenizer()
    tokenizer.chat_template = (  # llava-hf's llava-1.5 template: content must be a list of parts
        "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    vision = {**VISION[family], "model_type": f"{family}_vision_model"}
    config = LlavaConfig(vision_config=vision, text_config=text_config(len(tokenizer)),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy, image_seq_length=16 + (strategy == "full"))
    torch.manual_seed(1)
    LlavaForConditionalGeneration(config).save_pretrained(str(directory))
    if family == "clip":
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy=strategy, chat_template=tokenizer.chat_template,
                   num_additional_image_tokens=1 if family == "clip" else 0).save_pretrained(str(directory))
    return directory


@contextlib.contextmanager
def warnings_of(name: str):
    """The messages of the warnings logger `name` emits inside the block (a handler of its own)."""
    logger, messages = logging.getLogger(name), []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, level = Collect(logging.WARNING), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize(("family", "layer", "strategy"),
                         [("clip", -2, "default"), ("clip", 2, "full"), ("siglip", -1, "full")])
def test_import_gives_transformers_logits(tmp_path: Path, family: str, layer: int, strategy: str) -> None:
    from transformers import LlavaForConditionalGeneration

    directory = hf_llava_dir(tmp_path / "llava", family, layer, strategy)
    with warnings_of("vlm") as logged:  # (earlier tests in the suite may change the logger's propagation)
        model, tokenizer = load_model({"tokenizer": "unused", "encoder": {"image_size": 64}}, init_from=directory)
    assert any("llava_v1" in m for m in logged)  # the list-only template cannot render training data: LLaVA's own
    model.eval()
    hf = LlavaForConditionalGeneration.from_pretrained(str(directory)).eval()
    prompt = build_processor(model, tokenizer).prompt(Record(messages=TWO_TURNS, images=[picture(2)]))
    assert model.encoder.image_size == 32 and model.config["chat_template"] == "llava_v1"
    with torch.no_grad():
        ours = model(prompt["input_ids"][None], pixel_values=prompt["pixel_values"]).logits
        theirs = hf(input_ids=prompt["input_ids"][None], pixel_values=prompt["pixel_values"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_import_fine_tune_with_lora_and_export_again(tmp_path: Path) -> None:
    import lightning as L
    from transformers import LlavaForConditionalGeneration

    from vlm.data.collate import Collator
    from vlm.stages.generative import GenerativeStage

    model, tokenizer = load_model({"chat_template": "llava_v1"},
                                  init_from=hf_llava_dir(tmp_path / "llava", "clip", -2, "default"),
                                  explicit=["chat_template"])
    processor = build_processor(model, tokenizer)
    collate = Collator(tokenizer.pad_token_id)
    records = [Record(messages=[*ONE_TURN, {"role": "assistant", "content": "a red circle"}],
                      images=[picture(i)]) for i in range(4)]
    batch = collate([processor(r) for r in records])
    stage = GenerativeStage(model, trainable=["projector", "decoder"], optim={"lr": 1e-2, "warmup_steps": 0},
                            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    stage.export(tmp_path / "model", tokenizer)
    tuned, tuned_tokenizer = VisionLanguageModel.from_pretrained(tmp_path / "model")
    out = export_llava(tuned.eval(), tuned_tokenizer, tmp_path / "again")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ours = tuned(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"]).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=0)


def test_a_model_llava_cannot_express_is_refused_with_every_part(tmp_path: Path) -> None:
    from vlm.export import main
    from vlm.models.encoders.timm_vit import TimmEncoder
    from vlm.models.projectors import PixelShuffleProjector

    tokenizer = make_tokenizer()
    encoder = TimmEncoder(model_name="vit_tiny_patch16_224", pretrained=False, image_size=16, patch_size=4,
                          embed_dim=32, depth=1, num_heads=2)
    decoder = build_decoder(pretrained=False, config=text_config(len(tokenizer)))
    model = VisionLanguageModel(encoder, PixelShuffleProjector(32, 32), decoder, image_token_id_of(tokenizer),
                                attention="prefix", config={"max_tiles": 4})
    problems = llava_problems(model, tokenizer)
    assert [p.split(":")[0] for p in problems] == ["encoder", "projector", "attention", "max_tiles"]
    model.save_pretrained(tmp_path / "model", tokenizer)
    with pytest.raises(SystemExit) as raised:
        main([f"model_dir={tmp_path / 'model'}", f"out={tmp_path / 'out'}"])
    message = str(raised.value)
    assert all(p in message for p in problems) and "TimmEncoder" in message and "PixelShuffleProjector" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    siglip = our_model(tokenizer, family="siglip", feature_layer=-1)
    with pytest.raises(NotMappableError, match="post-layernorm"):
        export_llava(siglip, tokenizer, tmp_path / "siglip")


def labelled_runs(sample: dict, tokenizer) -> list[str]:
    """The labelled tokens, decoded run by run (a run off by one token changes its text)."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"].tolist(), sample["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize(("template", "llama_like", "ends"), [
    ("llava_v1", False, (" ", "</s>")), ("chatml", False, ("", "<|im_end|>")), ("llava_v1", True, ("", "</s>"))])
def test_labels_cover_each_reply_and_its_end_under_each_template(template: str, llama_like: bool,
                                                                 ends: tuple[str, str]) -> None:
    tokenizer = make_tokenizer(template, llama_like)
    model = our_model(tokenizer)
    conversation = [*TWO_TURNS, {"role": "assistant", "content": "at the top left"}]
    sample = build_processor(model, tokenizer)(Record(messages=conversation, images=[picture()]))
    space, end = ends
    assert labelled_runs(sample, tokenizer) == [f"{space}a red circle{end}", f"{space}at the top left{end}"]
    bos = sample["input_ids"].tolist().count(tokenizer.bos_token_id)
    assert bos == (template == "llava_v1")  # the template writes BOS once; nothing adds a second
    text = tokenizer.decode(sample["input_ids"].tolist())
    if template == "llava_v1" and not llama_like:  # LLaVA's conv_vicuna_v1, separators and all
        system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the human's questions.")
        images = "<image>" * model.tokens_per_image
        assert text == (f"<s>{system} USER: {images}\nwhat colour is the circle? ASSISTANT: a red circle</s>"
                        "USER: where is it? ASSISTANT: at the top left</s>")


def test_llava_7b_preset_uses_llava_v1() -> None:
    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        assert compose("train", overrides=["model=llava_7b"]).model.chat_template == "llava_v1"
        assert compose("train").model.chat_template is None
