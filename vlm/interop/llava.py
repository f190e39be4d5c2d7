"""transformers' `LlavaForConditionalGeneration` <-> `VisionLanguageModel`, both ways, weights copied exactly.

A Llava model is a CLIP or SigLIP vision tower read at one hidden layer (`vision_feature_layer`, CLS dropped or not:
`vision_feature_select_strategy`), a Linear-GELU-Linear projector, and a causal LM whose `<image>` embeddings are
replaced by the image features one for one. That is our `HFVisionEncoder` + `MLPProjector(depth=2)` + a Hugging Face
decoder with `attention="causal"` and one tile per image, so those models map; anything else (timm encoders, pixel
shuffle, GIT projectors, prefix attention, tiles with markers) is refused with one message listing every part.

Export builds the Llava model on the meta device, hands it our tensors and lets transformers write the directory
(`save_pretrained`: its own config and weight names), with a `LlavaProcessor` whose image processor resizes and
normalises as ours does and whose chat template is the one the model was trained with. Import loads a local Llava
directory with transformers and moves its modules into our part classes (built on the meta device, then given the
loaded modules), so nothing is allocated twice and nothing in the directory names code.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("vlm")

FAMILY_OF_VISION_TYPE = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
LLAVA_PROJECTOR_ACT = "gelu"  # nn.GELU() in our MLPProjector: the exact erf GELU, ACT2FN["gelu"]


class NotMappableError(ValueError):
    """A model (or a Llava directory) with parts the other side cannot express; the message lists them all."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{what}:\n" + "\n".join(f"  - {p}" for p in problems))


def is_llava_directory(path: str | Path) -> bool:
    """A local directory whose `config.json` says `model_type: llava` (a transformers Llava checkpoint)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


# ---- our model -> Llava ---------------------------------------------------------------------------------------
def _decoder_keys(decoder: nn.Module) -> tuple[str, str]:
    """(base model attribute, output embedding's state-dict key) of a Hugging Face causal LM."""
    prefix = getattr(decoder, "base_model_prefix", "") or ""
    head = decoder.get_output_embeddings() if hasattr(decoder, "get_output_embeddings") else None
    head_key = next((name for name, module in decoder.named_modules() if module is head and head is not None), "")
    return prefix, head_key


def llava_problems(model: nn.Module, tokenizer: Any = None) -> list[str]:
    """Every reason `model` cannot be written as a Llava model (empty: it can)."""
    from vlm.models.encoders.hf import HFVisionEncoder
    from vlm.models.projectors import MLPProjector

    problems = []
    encoder, projector, decoder = model.encoder, model.projector, model.decoder
    if not isinstance(encoder, HFVisionEncoder):
        problems.append(f"encoder: {type(encoder).__name__} (Llava's vision tower is a Hugging Face CLIP or SigLIP "
                        "model: only HFVisionEncoder maps)")
    else:
        if encoder.family == "siglip" and encoder.feature_layer == -1:
            problems.append("encoder: SigLIP at feature_layer -1 returns its post-layernorm output, which Llava never "
                            "reads (its layer -1 is the last block's output, before that norm); models meant for "
                            f"export train with feature_layer={int(encoder.model.config.num_hidden_layers) - 1} "
                            "(that output) or -2")
    if not (isinstance(projector, MLPProjector) and projector.options.get("depth") == 2):
        what = type(projector).__name__ + (f" depth {projector.options.get('depth')}"
                                           if isinstance(projector, MLPProjector) else "")
        problems.append(f"projector: {what} (Llava's projector is Linear-GELU-Linear: MLPProjector depth 2)")
    if model.attention != "causal":
        problems.append(f"attention: {model.attention} (Llava's language model is causal over image tokens too)")
    max_tiles = int((model.config or {}).get("max_tiles", 1) or 1)
    if max_tiles > 1:
        problems.append(f"max_tiles: {max_tiles} (tiles with markers and a thumbnail; Llava takes one image "
                        "per <image>)")
    if hasattr(decoder, "merge_and_unload"):
        problems.append("decoder: carries LoRA adapters (merge them first: merge_and_unload)")
    else:
        prefix, head_key = _decoder_keys(decoder)
        names = [k for k in decoder.state_dict()]
        stray = [k for k in names if not (prefix and k.startswith(prefix + ".")) and not k.startswith(head_key + ".")]
        if not prefix or not head_key or stray:
            problems.append(f"decoder: {type(decoder).__name__} is not a base model plus an LM head "
                            f"(weights outside both: {stray[:3]})")
    if tokenizer is not None:
        from vlm.models.vlm import IMAGE_TOKEN

        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.image_token_id:
            problems.append(f"tokenizer: {IMAGE_TOKEN} is not the model's image token {model.image_token_id}")
    return problems


def _feature_layer_to_llava(encoder: Any) -> int:
    """Our feature_layer as an index into the tower's `hidden_states` (Llava's `vision_feature_layer`)."""
    layers = int(encoder.model.config.num_hidden_layers)
    layer = encoder.feature_layer
    return layer if layer < 0 else layer - layers  # block k's output is hidden_states[k + 1] = [k - layers]


def _select_strategy(encoder: Any) -> str:
    # "default" drops the first token (CLIP's CLS); SigLIP has none, so it is always "full" there.
    return "default" if encoder.num_prefix_tokens and encoder.drop_cls else "full"


def llava_config(model: nn.Module, tokenizer: Any = None):
    """The `LlavaConfig` of a mappable model (raises `NotMappableError` listing every part that is not)."""
    from transformers import LlavaConfig

    problems = llava_problems(model, tokenizer)
    if problems:
        raise NotMappableError("this model cannot be written as a transformers Llava model", problems)
    encoder, decoder = model.encoder, model.decoder
    text_config = decoder.config
    # at another resolution than the tower's table, the table is resampled for export (`llava_state_dict`)
    config = LlavaConfig(
        vision_config={**encoder.model.config.to_dict(), "image_size": encoder.image_size},
        text_config=text_config.to_dict(),
        image_token_id=model.image_token_id,
        image_seq_length=model.tokens_per_image,
        projector_hidden_act=LLAVA_PROJECTOR_ACT,
        vision_feature_select_strategy=_select_strategy(encoder),
        vision_feature_layer=_feature_layer_to_llava(encoder),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def llava_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under transformers' current Llava names (the tensors themselves, not copies)."""
    from vlm.models.encoders.base import resample_positions

    prefix, head_key = _decoder_keys(model.decoder)
    encoder = model.encoder
    tower = encoder.model.state_dict()
    if encoder.image_size != int(encoder.model.config.image_size):
        # what the tower's forward does on the fly at this size (bicubic, align_corners=False), done once
        rows, cols = encoder.grid
        for key, num_prefix in encoder.position_tables().items():
            key = key.removeprefix("model.")
            tower[key] = resample_positions(tower[key], num_prefix + rows * cols, num_prefix)
    out = {f"model.vision_tower.{k}": v for k, v in tower.items()}
    projector = model.projector.proj  # Sequential(Linear, GELU, Linear)
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        for key, value in projector[index].state_dict().items():
            out[f"model.multi_modal_projector.{name}.{key}"] = value
    for key, value in model.decoder.state_dict().items():
        if key.startswith(prefix + "."):
            out["model.language_model." + key[len(prefix) + 1:]] = value
        else:
            out["lm_head." + key[len(head_key) + 1:]] = value
    return out


def to_llava(model: nn.Module, tokenizer: Any = None):
    """A `LlavaForConditionalGeneration` that shares our model's tensors (built on the meta device, then assigned)."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(model, tokenizer)
    attn = getattr(model.decoder.config, "_attn_implementation", None) or "sdpa"
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn,
                                                           dtype=model.decoder.dtype)
    llava.load_state_dict(llava_state_dict(model), strict=True, assign=True)
    llava.tie_weights()
    # non-persistent buffers (position ids, rotary frequencies) are not in a state dict: take the model's own
    _copy_buffers(model.encoder.model, llava.model.vision_tower)
    _copy_buffers(getattr(model.decoder, _decoder_keys(model.decoder)[0]), llava.model.language_model)
    return llava.eval()


def _copy_buffers(source: nn.Module, target: nn.Module) -> None:
    own = dict(source.named_buffers())
    for name, buffer in list(target.named_buffers()):
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            module = target.get_submodule(module_name) if module_name else target
            value = own[name]
            if value.shape != buffer.shape and attr == "position_ids":  # a resampled position table's ids
                value = torch.arange(buffer.shape[-1], device=value.device).expand(buffer.shape)
            module._buffers[attr] = value
    if hasattr(source, "rotary_emb") and hasattr(target, "rotary_emb"):
        for key, value in vars(source.rotary_emb).items():  # e.g. attention_scaling, plain attributes
            if not key.startswith("_") and isinstance(value, (int, float)):
                setattr(target.rotary_emb, key, value)


def llava_processor(model: nn.Module, tokenizer: Any):
    """A `LlavaProcessor` that gives the ids and pixels our processor gives: the training chat template (made to
    accept lists of parts too), `<image>` expanded to the model's tokens per image, images resized to a square of
    the encoder's size (bicubic, no crop) and normalised with the encoder's mean and std."""
    import copy

    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from vlm.data.chat_templates import LEGACY_EQUIVALENTS
    from vlm.models.vlm import IMAGE_TOKEN

    encoder = model.encoder
    size = {"height": encoder.image_size, "width": encoder.image_size}
    image_processor = LlavaImageProcessorPil(
        do_resize=True, size=size, do_center_crop=False, crop_size=size, resample=3,  # PIL bicubic, as ours
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(encoder.image_mean),
        image_std=list(encoder.image_std), do_convert_rgb=True, do_pad=False)
    tokenizer = copy.deepcopy(tokenizer)
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise NotMappableError("the tokenizer cannot be exported", ["it has no chat template"])
    template = LEGACY_EQUIVALENTS.get(template, template)
    tokenizer.chat_template = template
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=encoder.patch_size,
                          vision_feature_select_strategy=_select_strategy(encoder), chat_template=template,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=encoder.num_prefix_tokens)


def export_llava(model: nn.Module, tokenizer: Any, directory: str | Path, legacy_names: bool = False) -> Path:
    """Write `model` (+ its processor) as a transformers Llava directory; all or nothing (temp dir, then rename).

    Weights go under transformers' current names (`model.vision_tower.*`, `model.multi_modal_projector.*`,
    `model.language_model.*`, `lm_head.*`; transformers >= 4.52 and vLLM read them). `legacy_names=True` writes
    the layout older readers expect (`vision_tower.*`, `language_model.model.*`, ...), which `save_pretrained`
    writes by default for backward compatibility."""
    from vlm.data.tokens import stop_token_ids
    from vlm.models.directory import staged_directory

    if tokenizer is None:
        raise ValueError("export needs the model's tokenizer (the model directory has no tokenizer files)")
    llava = to_llava(model, tokenizer)
    processor = llava_processor(model, tokenizer)
    generation = llava.generation_config
    generation.eos_token_id = stop_token_ids(tokenizer) or None
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    with staged_directory(directory) as tmp:
        llava.save_pretrained(str(tmp), save_original_format=legacy_names)
        processor.save_pretrained(str(tmp))
    return Path(directory)


# ---- Llava -> our model ---------------------------------------------------------------------------------------
def _import_problems(config: Any, processor: Any) -> list[str]:
    from vlm.models.encoders.hf import FAMILIES
    from vlm.models.vlm import IMAGE_TOKEN

    problems = []
    vision_type = getattr(config.vision_config, "model_type", None)
    family = FAMILY_OF_VISION_TYPE.get(vision_type)
    if family is None:
        problems.append(f"vision tower: {vision_type} (only CLIP and SigLIP vision models map to HFVisionEncoder)")
    layer = config.vision_feature_layer
    layers = int(getattr(config.vision_config, "num_hidden_layers", 0))
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer: {layer} (features of several layers concatenated; our encoder "
                        "reads one layer)")
    elif layer == 0 or layer < -layers or layer > layers:
        problems.append(f"vision_feature_layer: {layer} (the embedding output or outside the tower's {layers} "
                        "blocks)")
    strategy = config.vision_feature_select_strategy
    if family == "siglip" and strategy == "default":
        problems.append("vision_feature_select_strategy: default on SigLIP drops a real patch (SigLIP has no CLS)")
    if config.projector_hidden_act != LLAVA_PROJECTOR_ACT:
        problems.append(f"projector_hidden_act: {config.projector_hidden_act} (our MLPProjector uses gelu)")
    if not config.multimodal_projector_bias:
        problems.append("multimodal_projector_bias: false (our MLPProjector has biases)")
    if processor is not None:
        token = getattr(processor, "image_token", IMAGE_TOKEN)
        if token != IMAGE_TOKEN:
            problems.append(f"image token: {token!r} (the processor expands {IMAGE_TOKEN!r})")
        elif processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
            problems.append(f"image token: the tokenizer's {IMAGE_TOKEN} is not config.image_token_id "
                            f"{config.image_token_id}")
        image = processor.image_processor
        size = _square_size(image)
        if size is None:
            problems.append(f"image processor: size {image.size} / crop {image.crop_size} is not one square")
        elif size != int(getattr(config.vision_config, "image_size", size)):
            problems.append(f"image processor: {size} px but the vision tower is {config.vision_config.image_size} px")
        if family is not None:
            spec = FAMILIES[family]
            for what, ours, theirs in (("mean", spec.mean, image.image_mean), ("std", spec.std, image.image_std)):
                if theirs is None or any(abs(a - b) > 1e-6 for a, b in zip(ours, theirs)):
                    problems.append(f"image processor: image_{what} {theirs} differs from {family}'s {list(ours)}")
    else:
        problems.append("processor: none in the directory (needs the tokenizer and image processor files)")
    return problems


def _square_size(image_processor: Any) -> int | None:
    """The side the processor's images end at (crop size when cropping), if square."""
    def side(d: Any) -> int | None:
        d = dict(d or {})
        if "height" in d and d.get("height") == d.get("width"):
            return int(d["height"])
        if "shortest_edge" in d:
            return int(d["shortest_edge"])
        return None
    if getattr(image_processor, "do_center_crop", False):
        return side(image_processor.crop_size)
    size = dict(image_processor.size or {})
    return side(size) if "height" in size else None


def _feature_layer_from_llava(layer: int, family: str, layers: int) -> int:
    if layer < 0:
        # SigLIP's -1 in our encoder is its post-layernorm output; the last block's plain output is block L-1
        return layers - 1 if (layer == -1 and family == "siglip") else layer
    return layer - 1  # hidden_states[k] is block k-1's output


def _chat_template(tokenizer: Any, processor: Any, requested: str | None) -> str | None:
    """Set the template our processor will render with; returns its name when it is a named one."""
    from vlm.data.chat_templates import renders_plain_messages, set_chat_template, template_name

    if requested:
        set_chat_template(tokenizer, requested)
        return requested
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        tokenizer.chat_template = template
        if renders_plain_messages(tokenizer):
            return template_name(template)
    log.warning("the Llava directory's chat template renders only lists of parts (llava-hf's inference template);"
                " training and prompting use llava_v1, LLaVA-1.5's own conversation (model.chat_template=NAME to "
                "choose another)")
    set_chat_template(tokenizer, "llava_v1")
    return "llava_v1"


def import_llava(directory: str | Path, chat_template: str | None = None,
                 max_length: int | None = None) -> tuple[nn.Module, Any]:
    """Load a local transformers Llava directory as (VisionLanguageModel, tokenizer); raises `NotMappableError`
    listing every part that has no counterpart here. Nothing is downloaded and no remote code runs."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from vlm.models.decoders import build_decoder
    from vlm.models.encoders.hf import HFVisionEncoder, clean_config
    from vlm.models.projectors import MLPProjector
    from vlm.models.vlm import VisionLanguageModel

    directory = Path(directory)
    if not is_llava_directory(directory):
        raise ValueError(f"{directory} is not a transformers Llava directory (config.json with model_type llava)")
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    try:
        processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        log.warning("no processor loaded from %s: %s", directory, exc)
        processor = None
    problems = _import_problems(config, processor)
    if problems:
        raise NotMappableError(f"{directory} cannot be loaded as a vlm model", problems)

    llava = LlavaForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True,
                                                          attn_implementation="sdpa")
    family = FAMILY_OF_VISION_TYPE[config.vision_config.model_type]
    layers = int(config.vision_config.num_hidden_layers)
    with torch.device("meta"):
        encoder = HFVisionEncoder(family, config=clean_config(config.vision_config),
                                  feature_layer=_feature_layer_from_llava(config.vision_feature_layer, family, layers),
                                  drop_cls=config.vision_feature_select_strategy == "default" or family == "siglip")
        text = config.text_config.to_dict()
        decoder = build_decoder(config={**text, "model_type": config.text_config.model_type}, pretrained=False)
    encoder.model = llava.model.vision_tower
    setattr(decoder, decoder.base_model_prefix, llava.model.language_model)
    decoder.set_output_embeddings(llava.lm_head)
    if getattr(config.text_config, "tie_word_embeddings", False) or config.tie_word_embeddings:
        decoder.config.tie_word_embeddings = True
    decoder.generation_config = llava.generation_config
    projector = MLPProjector(encoder.hidden_size, int(config.text_config.hidden_size), depth=2)
    projector.proj[0].load_state_dict(llava.model.multi_modal_projector.linear_1.state_dict())
    projector.proj[2].load_state_dict(llava.model.multi_modal_projector.linear_2.state_dict())
    left = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers(), *encoder.named_parameters(),
                           *encoder.named_buffers()] if t.is_meta]
    if left:
        raise NotMappableError(f"{directory} cannot be loaded as a vlm model",
                               [f"weights the Llava model does not provide: {left[:5]}"])

    tokenizer = processor.tokenizer
    name = _chat_template(tokenizer, processor, chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # the collator masks padding by length, not by id
    max_positions = int(getattr(config.text_config, "max_position_embeddings", 2048) or 2048)
    recipe = {"max_tiles": 1, "max_length": int(max_length or min(max_positions, 2048)),
              "imported_from": str(directory)}
    if name:
        recipe["chat_template"] = name
    model = VisionLanguageModel(encoder, projector, decoder, int(config.image_token_id), "causal", config=recipe)
    return model.train(), tokenizer  # like a freshly built model (transformers hands its modules over in eval mode)
