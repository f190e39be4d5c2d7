"""Scale-out on the CPU with 2 processes over gloo (issue 5): DDP equals one process with the combined batch, and
the `fsdp` preset (FSDP2 under ModelParallelStrategy) trains align and sft with frozen parts, writes sharded
checkpoints that resume exactly, and its consolidated weights give the sharded model's logits in one process.

The 2-process runs are standalone scripts (tests/scripts/) started as subprocesses: Lightning's `ddp` and
ModelParallelStrategy start rank 1 by re-running the script, which must never be pytest itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from vlm.distributed import block_classes, find_blocks, materialize, meta_skeleton, resolve_dtype
from vlm.models.vlm import VisionLanguageModel
from vlm.stages.generative import GenerativeStage

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from launch import run_script  # noqa: E402

OPTIM = {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.01, "scheduler": "cosine"}  # as in scripts/ddp_run.py


# `shapes` (conftest): the sizes of debug=tiny_shapes, which tests/scripts/*.py compose with: the data is ready
@pytest.fixture(scope="module")
def base_dir(shapes: Path, compose_config, tmp_path_factory) -> Path:
    from omegaconf import OmegaConf

    from vlm.loading import load_model

    cfg = compose_config("train", [f"paths.data_dir={shapes.parent}"])
    torch.manual_seed(0)
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    return model.save_pretrained(tmp_path_factory.mktemp("base") / "model", tokenizer)


def logits_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits


# ---- block discovery and the export skeleton (in-process, fast) -------------------------------------------------
def test_blocks_are_found_in_the_instantiated_model(base_dir: Path) -> None:
    model, _ = VisionLanguageModel.from_pretrained(base_dir)
    names = sorted(c.__name__ for c in block_classes(model))
    assert names == ["Block", "LlamaDecoderLayer"]  # timm ViT blocks and the Llama layers, nothing named in code
    blocks = find_blocks(model)
    assert len(blocks) == len(model.encoder.model.blocks) + model.decoder.config.num_hidden_layers
    assert not any(b is model.projector or b in list(model.projector.modules()) for b in blocks)
    stage = GenerativeStage(model, trainable=["decoder"], lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    assert len(find_blocks(stage.model)) == len(blocks)  # still found inside peft's wrappers
    assert resolve_dtype("auto", torch.device("cpu")) is None
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_meta_skeleton_takes_no_memory_and_reloads_exactly(base_dir: Path) -> None:
    model, _ = VisionLanguageModel.from_pretrained(base_dir)
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.decoder.lm_head.weight is skeleton.decoder.get_input_embeddings().weight  # still tied
    rebuilt = materialize(skeleton, model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(logits_of(rebuilt, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                   "pixel_values": None}),
                               logits_of(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                 "pixel_values": None}), rtol=0, atol=0)


# ---- DDP --------------------------------------------------------------------------------------------------------
def fixed_batches(model: VisionLanguageModel, steps: int, ranks: int = 2, per_rank: int = 3, text: int = 12):
    """Batches with the same number of labelled tokens on every rank, so DDP's mean of per-rank means is the mean
    over the combined batch."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.decoder.get_input_embeddings().num_embeddings
    size = model.encoder.image_size
    out = []
    for rank in range(ranks):
        batches = []
        for step in range(steps):
            ids = torch.randint(20, vocab, (per_rank, text), generator=gen)
            ids = torch.cat([torch.full((per_rank, model.tokens_per_image), model.image_token_id), ids], 1)
            labels = ids.clone()
            labels[:, : model.tokens_per_image] = -100
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                            "pixel_values": torch.randn(per_rank, 3, size, size, generator=gen),
                            "keys": [f"rank{rank}-step{step}-{i}" for i in range(per_rank)]})
        out.append(batches)
    return out


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_combined_batch(base_dir: Path, tmp_path: Path) -> None:
    model, _ = VisionLanguageModel.from_pretrained(base_dir)
    steps = 3
    per_rank = fixed_batches(model, steps + 1)
    torch.save({"base": str(base_dir), "steps": steps, "batches": per_rank}, tmp_path / "input.pt")
    run_script("ddp_run.py", tmp_path / "input.pt", tmp_path, timeout=300)

    combined = [{k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) else a[k] + b[k] for k in a}
                for a, b in zip(*per_rank)]
    stage = GenerativeStage(model, trainable=["projector", "decoder"], optim=OPTIM)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(combined, batch_size=None))
    expected = stage.model.state_dict()
    got = torch.load(tmp_path / "weights.pt", weights_only=True)
    base = load_file(base_dir / "model.safetensors")
    moved = max((expected[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # the comparison below is not trivially about untrained weights
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")

    # a NaN loss on rank 1 only, guards.nonfinite_loss=skip: both ranks skip that step together (no hang, no drift)
    skip = torch.load(tmp_path / "skip.pt", weights_only=True)
    assert skip["skipped"] == 1 and skip["global_step"] == 2
    for key, value in skip["ranks"][0].items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(skip["ranks"][1][key], value, rtol=0, atol=0)


# ---- FSDP2 ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsdp_preset_align_and_sft_sharded_checkpoints_and_consolidation(shapes: Path, base_dir: Path,
                                                                        tmp_path: Path) -> None:
    from vlm.checkpointing import apply_checkpoint, list_checkpoints, load_trainable_weights

    run_script("fsdp_run.py", shapes.parent, base_dir, tmp_path, timeout=420)
    base = load_file(base_dir / "model.safetensors")

    # align: encoder and decoder frozen and sharded; sharded checkpoints every 2 steps and at the end
    align = tmp_path / "align"
    ckpts = list_checkpoints(align / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000002.ckpt", "step-00000003.ckpt"]
    assert all(p.is_dir() and len(list(p.glob("*.distcp"))) == 2 for p in ckpts)  # one shard file per rank
    weights, info = load_trainable_weights(ckpts[-1])
    assert {k.split(".")[1] for k in weights} == {"projector"}  # frozen parts are not in stage checkpoints
    assert info["trainable"] == ["projector"] and info["base"]["init_from"] == str(base_dir)
    trained = load_file(align / "model" / "model.safetensors")
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], trained[k])}
    assert changed == {"projector"}

    # the consolidated model directory and base + sharded checkpoint, in one process, give the sharded logits
    sharded = torch.load(align / "logits.pt", weights_only=True)
    model, _ = VisionLanguageModel.from_pretrained(align / "model")
    torch.testing.assert_close(logits_of(model, sharded["batch"]), sharded["logits"], rtol=0, atol=1e-6)
    model, _ = VisionLanguageModel.from_pretrained(base_dir)
    stage = GenerativeStage(model, trainable=["projector"], name="align")
    apply_checkpoint(stage, ckpts[-1])
    torch.testing.assert_close(logits_of(stage.model, sharded["batch"]), sharded["logits"], rtol=0, atol=1e-6)

    # resumed from the step-2 sharded checkpoint (weights, optimizer, schedule, data position): the same step 3
    resumed = load_file(tmp_path / "align_resumed" / "model" / "model.safetensors")
    for key, value in trained.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)

    # sft from align's directory, activation checkpointing on: projector and decoder train, the encoder stays
    sft = load_file(tmp_path / "sft" / "model" / "model.safetensors")
    changed = {k.split(".")[0] for k in trained if not torch.equal(trained[k], sft[k])}
    assert changed == {"projector", "decoder"}
    sharded = torch.load(tmp_path / "sft" / "logits.pt", weights_only=True)
    model, _ = VisionLanguageModel.from_pretrained(tmp_path / "sft" / "model")
    torch.testing.assert_close(logits_of(model, sharded["batch"]), sharded["logits"], rtol=0, atol=1e-6)
    single_file = tmp_path / "sft" / "checkpoints" / "step-00000002.ckpt"
    assert single_file.is_file()  # save_distributed_checkpoint=false: full trainable weights gathered to rank 0
    weights, _ = load_trainable_weights(single_file)
    assert {k.split(".")[1] for k in weights} == {"projector", "decoder"}
    reloaded = load_file(tmp_path / "sft_reloaded" / "model" / "model.safetensors")  # loaded into FSDP2 shards
    for key, value in sft.items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)
