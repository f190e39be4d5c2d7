"""The `fsdp` trainer preset on 2 CPU processes (gloo), for tests/test_distributed.py.

    python tests/scripts/fsdp_run.py DATA_DIR BASE_MODEL_DIR OUT_DIR

Lightning's ModelParallelStrategy starts the second rank by running this script again. Four runs go through
`vlm.run.run_stage` with `trainer=fsdp`: `align` from BASE (frozen encoder and decoder; sharded checkpoints at
steps 2 and 3); `align` again, resumed from the step-2 checkpoint; `sft` from align's model directory (frozen
encoder, activation checkpointing on, its checkpoint gathered into one file); and `sft` once more, resumed from
that file at its last step (it loads and exports at once). At the end of each fit the still-sharded model computes
logits on a fixed batch; rank 0 saves them to OUT/<run>/logits.pt next to the consolidated model directory.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONF = str(Path(__file__).resolve().parents[2] / "conf")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def fixed_batch(processor) -> dict:
    from PIL import Image

    from vlm.data.collate import Collator
    from vlm.data.formats import Record

    records = [Record(messages=[{"role": "user", "content": "<image>\nwhat is it?"},
                                {"role": "assistant", "content": word}],
                      images=[Image.new("RGB", (64, 64), color)], meta={"key": word})
               for word, color in (("red circle", (200, 10, 10)), ("blue", (10, 10, 200)))]
    batch = Collator(processor.pad_token_id, padding_side="right")([processor(r) for r in records])
    batch.pop("keys", None)
    return batch


def main() -> None:
    from hydra import compose, initialize_config_dir

    from vlm.run import run_stage
    from vlm.stages.base import Stage

    data_dir, base, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def on_train_end(self) -> None:
        batch = fixed_batch(self.trainer.datamodule.processor)
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=batch["pixel_values"]).logits
        self.model.train()
        if self.trainer.is_global_zero:
            torch.save({"batch": batch, "logits": logits}, Path(self.trainer.default_root_dir) / "logits.pt")

    Stage.on_train_end = on_train_end
    common = [f"paths.data_dir={data_dir}", "debug=tiny_shapes", "data.batch_size=2", "trainer=fsdp",
              "trainer.accelerator=cpu", "trainer.devices=2", "trainer.val_check_interval=1000",
              "callbacks.checkpoint.every_n_steps=2", "callbacks.checkpoint.keep_last=-1", "optim.lr=3e-3"]
    runs = {
        "align": ["stage=align", f"init_from={base}", "trainer.max_steps=3"],
        "align_resumed": ["stage=align", f"init_from={base}", "trainer.max_steps=3",
                          f"resume={out / 'align' / 'checkpoints' / 'step-00000002.ckpt'}"],
        "sft": ["stage=sft", f"init_from={out / 'align' / 'model'}", "trainer.max_steps=2",
                "trainer.strategy.activation_checkpointing=true", "trainer.strategy.save_distributed_checkpoint=false"],
        "sft_reloaded": ["stage=sft", f"init_from={out / 'align' / 'model'}", "trainer.max_steps=2",
                         f"resume={out / 'sft' / 'checkpoints' / 'step-00000002.ckpt'}"],
    }
    for name, overrides in runs.items():
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", overrides=[*common, *overrides, f"run_dir={out / name}"])
        run_stage(cfg)


if __name__ == "__main__":
    main()
