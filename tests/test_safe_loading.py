"""A model directory is data: crafted `vlm.yaml` / `clip.yaml` / run `config.yaml` files that name code are refused by
every loader before anything they name runs, and directories written with registered `_target_` paths still load.

Two payloads, both checked first to really run code when Hydra instantiates them: `pathlib.Path.touch` (a path Hydra's
blocklist lets through) and a nested `torch.load(io.BytesIO(bytes.fromhex(<pickle>)), weights_only=False)` whose
pickle touches a marker file. A refusal test passes only if the loader raises, names the key and the path, and the
marker file does not exist.
"""

from __future__ import annotations

import pathlib
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from vlm.models.registry import UnsafeConfigError, build, registry

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


# ---- payloads ----------------------------------------------------------------------------------------------------
class _TouchOnUnpickle:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def touch_spec(marker: Path) -> dict[str, Any]:
    return {"_target_": "pathlib.Path.touch", "_args_": [str(marker)]}


def pickle_spec(marker: Path) -> dict[str, Any]:
    """torch.load of an inline pickle that touches `marker` when unpickled."""
    blob = pickle.dumps(_TouchOnUnpickle(marker)).hex()
    return {"_target_": "torch.load", "weights_only": False,
            "f": {"_target_": "io.BytesIO",
                  "initial_bytes": {"_target_": "builtins.bytes.fromhex", "_args_": [blob]}}}


@pytest.mark.parametrize("payload", [touch_spec, pickle_spec])
def test_the_payloads_run_code_when_hydra_instantiates_them(payload, tmp_path: Path) -> None:
    """The control: what the refusal tests feed the loaders is a real attack on a loader that calls Hydra."""
    from hydra.utils import instantiate

    marker = tmp_path / "marker"
    try:
        instantiate(payload(marker))
    except Exception:  # torch.load fails on the magic number, after the pickle has run
        pass
    assert marker.exists()


# ---- a tiny saved model, shared: `world` (conftest) ----------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def copy_with_config(source: Path, target: Path, name: str, config: dict[str, Any]) -> Path:
    """A copy of a model directory (weights, tokenizer) whose config file is replaced by `config`."""
    shutil.copytree(source, target)
    (target / name).write_text(yaml.safe_dump(config))
    return target


def crafted_vlm(world: dict[str, Path], tmp_path: Path, payload: str, marker: Path) -> Path:
    config = read_yaml(world["model"] / "vlm.yaml")
    if payload == "path":
        config["encoder"] = touch_spec(marker)
    else:  # nested inside a registered part's arguments
        config["encoder"]["weights"] = pickle_spec(marker)
    return copy_with_config(world["model"], tmp_path / "crafted", "vlm.yaml", config)


EXPECTED = {"path": r"encoder\._target_: 'pathlib\.Path\.touch'",
            "pickle": r"encoder\.weights\._target_: 'torch\.load'"}


# ---- vlm.yaml through every loader ---------------------------------------------------------------------------------
def via_evaluate(model_dir: Path, world: dict[str, Path], tmp_path: Path) -> None:
    from vlm.run import run_evaluation

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_dir={model_dir}", f"run_dir={tmp_path / 'eval'}",
                                             f"task.data={world['shapes'] / 'test.txt'}", "task.limit=2"])
    run_evaluation(cfg)


def via_chat(model_dir: Path, world: dict[str, Path], tmp_path: Path) -> None:
    from vlm.chat import main

    main([f"model_dir={model_dir}"], read=lambda _: "/quit", write=lambda _: None)


def via_nearest_tokens(model_dir: Path, world: dict[str, Path], tmp_path: Path) -> None:
    from vlm.analysis.nearest_tokens import main

    main([f"model_dir={model_dir}", f"image={world['image']}", f"out={tmp_path / 'words.png'}"])


def via_init_from(model_dir: Path, world: dict[str, Path], tmp_path: Path) -> None:
    from vlm.loading import load_model

    load_model({"tokenizer": str(world["shapes"] / "tokenizer"), "encoder": {}}, init_from=model_dir)


LOADERS: dict[str, Callable[..., None]] = {"evaluate": via_evaluate, "chat": via_chat,
                                           "nearest_tokens": via_nearest_tokens, "init_from": via_init_from}


@pytest.mark.parametrize("payload", ["path", "pickle"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_crafted_vlm_yaml_is_refused_by_every_loader(world, tmp_path: Path, loader: str, payload: str) -> None:
    marker = tmp_path / "marker"
    crafted = crafted_vlm(world, tmp_path, payload, marker)
    with pytest.raises(UnsafeConfigError, match=EXPECTED[payload]):
        LOADERS[loader](crafted, world, tmp_path)
    assert not marker.exists()


# ---- clip.yaml ------------------------------------------------------------------------------------------------------
def crafted_clip(world: dict[str, Path], tmp_path: Path, payload: str, marker: Path) -> Path:
    encoder = read_yaml(world["model"] / "vlm.yaml")["encoder"]
    text = {"type": "hf_text", "config": {"model_type": "clip_text_model", "vocab_size": 64, "hidden_size": 16,
                                          "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "max_position_embeddings": 16}}
    if payload == "path":
        encoder = touch_spec(marker)
    else:
        encoder = {**encoder, "weights": pickle_spec(marker)}
    config = {"kind": "clip", "encoder": encoder, "text_encoder": text, "embed_dim": 8, "loss": "clip"}
    return copy_with_config(world["model"], tmp_path / "crafted_clip", "clip.yaml", config)


def clip_via_evaluate(model_dir: Path, world: dict[str, Path], tmp_path: Path) -> None:
    from vlm.run import run_evaluation

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=["task=zeroshot", f"model_dir={model_dir}", f"run_dir={tmp_path / 'e'}",
                                             f"task.data={world['shapes'] / 'test.txt'}"])
    run_evaluation(cfg)


def clip_via_init_from(model_dir: Path, world: dict[str, Path], tmp_path: Path) -> None:
    from vlm.loading import load_model

    load_model({"tokenizer": str(world["shapes"] / "tokenizer"), "encoder": {}, "text_encoder": {}},
               init_from=model_dir)


@pytest.mark.parametrize("payload", ["path", "pickle"])
@pytest.mark.parametrize("loader", [clip_via_evaluate, clip_via_init_from], ids=["evaluate", "init_from"])
def test_crafted_clip_yaml_is_refused(world, tmp_path: Path, loader, payload: str) -> None:
    marker = tmp_path / "marker"
    crafted = crafted_clip(world, tmp_path, payload, marker)
    with pytest.raises(UnsafeConfigError, match=EXPECTED[payload]):
        loader(crafted, world, tmp_path)
    assert not marker.exists()


# ---- what a directory may and may not say ----------------------------------------------------------------------------
def test_saved_directory_names_parts_by_type_only(world) -> None:
    config = read_yaml(world["model"] / "vlm.yaml")
    assert (config["encoder"]["type"], config["projector"]["type"], config["decoder"]["type"]) == (
        "timm_vit", "mlp", "hf_causal_lm")
    assert "_target_" not in (world["model"] / "vlm.yaml").read_text()


def test_old_directory_with_registered_paths_still_loads(world, tmp_path: Path) -> None:
    from vlm.models.vlm import VisionLanguageModel

    config = read_yaml(world["model"] / "vlm.yaml")
    old = {"encoder": "vlm.models.encoders.timm_vit.TimmEncoder", "projector": "vlm.models.projectors.MLPProjector",
           "decoder": "vlm.models.decoders.build_decoder"}
    for part, path in old.items():  # as the export wrote them before part types existed
        config[part] = {"_target_": path, **{k: v for k, v in config[part].items() if k != "type"}}
    config["projector"]["_partial_"] = True
    old_dir = copy_with_config(world["model"], tmp_path / "old", "vlm.yaml", config)
    new, _ = VisionLanguageModel.from_pretrained(world["model"])
    loaded, tokenizer = VisionLanguageModel.from_pretrained(old_dir)
    ids = torch.tensor([tokenizer("a red circle")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, new.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("where", "spec", "message"), [
    ("unknown type", {"type": "os_system"}, r"encoder\.type: 'os_system' is not a registered encoder type"),
    ("path of another kind", {"_target_": "vlm.models.projectors.MLPProjector"},
     r"encoder\._target_: 'vlm\.models\.projectors\.MLPProjector' is not a registered encoder"),
    ("both", {"type": "timm_vit", "_target_": "vlm.models.encoders.timm_vit.TimmEncoder"}, "not both"),
    ("no type", {"model_name": "vit_tiny_patch16_224"}, r"encoder: no `type`"),
])
def test_part_specs_that_name_no_registered_type_are_refused(where: str, spec: dict, message: str) -> None:
    with pytest.raises(UnsafeConfigError, match=message):
        build("encoder", spec, "vlm.yaml: encoder")


def test_a_target_anywhere_else_in_the_file_is_refused(world, tmp_path: Path) -> None:
    from vlm.models.vlm import VisionLanguageModel

    marker = tmp_path / "marker"
    config = {**read_yaml(world["model"] / "vlm.yaml"), "notes": [{"see": touch_spec(marker)}]}
    crafted = copy_with_config(world["model"], tmp_path / "crafted", "vlm.yaml", config)
    with pytest.raises(UnsafeConfigError, match=r"notes\[0\]\.see\._target_: 'pathlib\.Path\.touch'"):
        VisionLanguageModel.from_pretrained(crafted)
    assert not marker.exists()


def test_hub_code_and_remote_code_never_come_from_the_file(monkeypatch) -> None:
    import transformers

    spec = {"type": "hf_causal_lm", "pretrained": True, "trust_remote_code": True,
            "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32}}
    seen: dict[str, Any] = {}
    original = transformers.AutoModelForCausalLM.from_config

    def spy(config, **kwargs):
        seen.update(kwargs)
        return original(config, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", spy)
    build("decoder", spec, "vlm.yaml: decoder")  # pretrained: built from the stored config, nothing is fetched
    assert seen["trust_remote_code"] is False
    build("decoder", spec, "vlm.yaml: decoder", trust_remote_code=True)  # the caller's choice
    assert seen["trust_remote_code"] is True
    with pytest.raises(UnsafeConfigError, match="attn_implementation"):
        build("decoder", {**spec, "attn_implementation": "kernels-community/flash-attn"}, "vlm.yaml: decoder")
    with pytest.raises(ValueError, match="not a torch dtype"):
        build("decoder", {**spec, "dtype": "load"}, "vlm.yaml: decoder")


def test_every_registered_class_writes_its_own_type() -> None:
    for kind in ("encoder", "projector", "text_encoder"):
        for name, cls in registry(kind).items():
            assert name == cls.part_type or (name, cls.part_type) == ("mlp2x_gelu", "mlp")


# ---- python -m vlm.model_from_checkpoint: a run's config.yaml ---------------------------------------------------
@pytest.fixture(scope="module")
def run(world, tmp_path_factory) -> dict[str, Any]:
    """A run directory as `train.py stage=align model=tiny` leaves it: config.yaml and a step checkpoint holding the
    projector, whose weights differ from the seeded base."""
    import lightning as L
    from omegaconf import OmegaConf

    from vlm.checkpointing import trainable_keys
    from vlm.loading import load_model
    from vlm.stages.generative import GenerativeStage

    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["stage=align", "model=tiny", f"paths.data_dir={world['root']}"])
    config = {"seed": 7, "init_from": None, "model": OmegaConf.to_container(cfg.model, resolve=True),
              "stage": OmegaConf.to_container(cfg.stage, resolve=True),
              "optim": OmegaConf.to_container(cfg.optim, resolve=True),
              "trainer": {"_target_": "lightning.Trainer", "max_steps": 1}}  # a section the export never reads
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    L.seed_everything(7, verbose=False)
    model, _ = load_model(config["model"])
    stage = GenerativeStage(model, trainable=config["stage"]["trainable"], optim=config["optim"], name="align")
    keys = set(trainable_keys(stage))
    state = {k: v + 1.0 for k, v in stage.state_dict().items() if k in keys}
    checkpoint = run_dir / "checkpoints" / "step-00000001.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": state, "vlm": {"stage": "align", "trainable": ["projector"]}}, checkpoint)
    return {"dir": run_dir, "config": config, "checkpoint": checkpoint, "base": model, "state": state}


def test_checkpoint_becomes_a_model_directory_through_the_registry(run, tmp_path: Path) -> None:
    from vlm.model_from_checkpoint import main
    from vlm.models.vlm import VisionLanguageModel

    out = main([f"checkpoint={run['checkpoint']}", f"out={tmp_path / 'model'}"])
    loaded, tokenizer = VisionLanguageModel.from_pretrained(out)
    weights = loaded.state_dict()
    for key, value in run["state"].items():  # the checkpoint's projector
        torch.testing.assert_close(weights[key.removeprefix("model.")], value, rtol=0, atol=0)
    for key, value in run["base"].encoder.state_dict().items():  # the frozen base, rebuilt from the seed
        torch.testing.assert_close(weights[f"encoder.{key}"], value, rtol=0, atol=0)
    assert tokenizer is not None


def crafted_run_config(run: dict[str, Any], where: str, marker: Path) -> dict[str, Any]:
    config = yaml.safe_load(yaml.safe_dump(run["config"]))
    if where == "model.encoder":
        config["model"]["encoder"] = touch_spec(marker)
    elif where == "model.decoder.config":
        config["model"]["decoder"]["config"]["rope_theta"] = pickle_spec(marker)
    elif where == "stage":
        config["stage"] = {**touch_spec(marker), "trainable": ["projector"]}
    else:
        config["optim"]["betas"] = [pickle_spec(marker), 0.999]
    return config


RUN_EXPECTED = {"model.encoder": r"model: encoder\._target_: 'pathlib\.Path\.touch'",
                "model.decoder.config": r"model: decoder\.config\.rope_theta\._target_: 'torch\.load'",
                "stage": r"stage\._target_: 'pathlib\.Path\.touch'",
                "optim": r"optim\.betas\[0\]\._target_: 'torch\.load'"}


@pytest.mark.parametrize("where", list(RUN_EXPECTED))
def test_crafted_run_config_is_refused_by_checkpointing(run, tmp_path: Path, where: str) -> None:
    from vlm.model_from_checkpoint import main

    marker = tmp_path / "marker"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(crafted_run_config(run, where, marker)))
    with pytest.raises(UnsafeConfigError, match=RUN_EXPECTED[where]):
        main([f"checkpoint={run['checkpoint']}", f"out={tmp_path / 'model'}", f"config={config}"])
    assert not marker.exists() and not (tmp_path / "model").exists()
