"""Data loading: our full pipeline against the raw decode+resize limit, and the quickstart's time waiting for data.

1. Throughput (samples/s). "full": the training DataModule (tar reading, shuffle buffer, decode, resize, chat
   template, tokenise, collate) with `--workers` DataLoader workers, as training runs it. "limit": the same decode
   and resize alone (`decode_image` + `ImageTransform` on the image bytes, in memory) in one process, times the
   number of workers. Measured alternately for `--rounds` rounds; medians compared (target: full >= 0.8 x limit).
   On a shared machine wall-clock rates swing with the load, so CPU time per sample (this process and the
   workers, from /proc) is compared too: limit CPU / full CPU is the ratio a machine with a free core per worker
   would show.
   Two image settings: the quickstart's (64 px PNG shapes, cut into 2x2 tiles + a thumbnail of 16 px each for
   `model=tiny_tiled`) and a typical one (384 px JPEG, resized to 224 px, as img2dataset shards of CC3M/LAION are).
2. The quickstart's stages (clip, lm, align, sft: the models and data config of conf/recipe/quickstart.yaml,
   1 worker): the share of step time spent waiting for the next batch, from a timer callback (time between one
   batch's end and the next one's start, i.e. fetch + transfer) and from Lightning's SimpleProfiler
   (`train_dataloader_next`).
   Target: under 5%.

3. Keep-or-drop (`--ablate`): the 384 px JPEG pipeline with each hand-written piece switched off, side by side in
   the same rounds: our tar header parser (off: webdataset's `tar_file_expander` reads every shard) and the
   shared-memory batch hand-over with its buffer pool (off: the workers yield plain batches and torch's
   DataLoader shares each tensor itself), and the chat-template fast path (`ChatRenderer`, on a private
   transformers function; off: every render through `apply_chat_template`). A piece stays only with >= 10%
   end-to-end gain.

    python benchmarks/loader_throughput.py [--rounds 3] [--batches 30] [--steps 40] [--threads 1] [--ablate]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import OmegaConf
from PIL import Image

from vlm.data.datamodule import DataModule
from vlm.data.formats import decode_image
from vlm.data.images import ImageTransform
from vlm.data.processor import Processor
from vlm.data.synthetic.shapes import ensure_shapes
from vlm.data.tokens import load_tokenizer
from vlm.loading import build_processor, load_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")
BATCH = 32
WARMUP_BATCHES = 4


# ---------------------------------------------------------------- data


def image_bytes(shards: list[str], field: str) -> list[bytes]:
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith("." + field)]
    return out


def jpeg_shards(shapes: Path, out: Path, size: int) -> list[str]:
    """The shapes world's train samples with their images redrawn at `size` px and stored as JPEG."""
    out.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard in (shapes / "train.txt").read_text().split():
        path = out / shard
        with tarfile.open(shapes / shard) as tar, wds.TarWriter(str(path)) as sink:
            samples: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
            for sample in samples.values():
                image = Image.open(io.BytesIO(sample.pop("png"))).convert("RGB").resize((size, size), Image.NEAREST)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                sink.write({**sample, "jpg": buffer.getvalue()})
        urls.append(str(path))
    return urls


# ---------------------------------------------------------------- throughput


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of other processes (DataLoader workers), from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def limit_rate(images: list[bytes], transform: ImageTransform) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample) of decode + resize alone, in this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    for data in images:
        transform(decode_image(data))
    return len(images) / (time.perf_counter() - wall), (time.process_time() - cpu) / len(images)


def full_rate(loader, batches: int) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample over this process and the workers) the DataLoader delivers, after a
    warm-up (workers started, shuffle buffers filled)."""
    stream = iter(loader)
    for _ in range(WARMUP_BATCHES):
        next(stream)
    iterator = getattr(loader, "_iterator", None)
    pids = [w.pid for w in getattr(iterator, "_workers", [])] if loader.num_workers else []
    wall, cpu, workers = time.perf_counter(), time.process_time(), cpu_seconds(pids)
    n = sum(len(next(stream)["keys"]) for _ in range(batches))
    used = time.process_time() - cpu + cpu_seconds(pids) - workers
    return n / (time.perf_counter() - wall), used / n


def throughput(name: str, urls: list[str], field: str, processor: Processor, workers: int, batches: int,
               rounds: int) -> dict[str, float]:
    images = image_bytes(urls[:1], field)[:400]
    dm = DataModule(processor, urls, format="conversation", batch_size=BATCH, num_workers=workers,
                    shuffle_buffer=1000, resampled=True, seed=0)
    loader = dm.train_dataloader()
    rows = []
    for r in range(rounds):
        limit, limit_cpu = limit_rate(images, processor.image_transform)
        full, full_cpu = full_rate(loader, batches)
        rows.append((limit * workers, full, limit_cpu, full_cpu))
        print(f"  [{name}] round {r}: limit {limit * workers:7.0f}/s  full {full:7.0f}/s   CPU per sample: "
              f"limit {1e6 * limit_cpu:6.0f} us  full {1e6 * full_cpu:6.0f} us", flush=True)
    one = DataModule(processor, urls, format="conversation", batch_size=BATCH, num_workers=0, shuffle_buffer=1000)
    inprocess, _ = full_rate(one.train_dataloader(), max(4, batches // 4))
    del loader
    limit, full, limit_cpu, full_cpu = (statistics.median(column) for column in zip(*rows))
    return {"limit": limit, "full": full, "ratio": full / limit, "inprocess": inprocess,
            "limit_cpu_us": 1e6 * limit_cpu, "full_cpu_us": 1e6 * full_cpu, "cpu_ratio": limit_cpu / full_cpu}


# ---------------------------------------------------------------- keep-or-drop of the hand-written pieces


def _switched_loader(dm: DataModule, tar_parser: bool, pool: bool, chat_fast_path: bool = True):
    """The DataModule's training loader with its workers started (forked) while the pieces are switched as asked:
    the workers keep the switch, the main process gets the originals back."""
    import vlm.data.stream as stream
    import vlm.data.tar as tar
    from vlm.data.collate import Collator
    from vlm.data.processor import ChatRenderer

    saved = tar.plain_path, stream.pack_batch, Collator.__call__, ChatRenderer.__call__
    if not tar_parser:
        tar.plain_path = lambda url: False  # every shard through webdataset's tar_file_expander
    if not pool:
        stream.pack_batch = lambda batch, pool=None: batch  # torch's own hand-over, tensor by tensor
        plain = Collator.__call__
        Collator.__call__ = lambda self, samples, lazy=False: plain(self, samples)  # concatenated pixels
    if not chat_fast_path:  # every render through transformers' apply_chat_template
        ChatRenderer.__call__ = lambda self, messages, add_generation_prompt=False: self.reference(
            messages, add_generation_prompt)
    try:
        loader = dm.train_dataloader()
        iterator = iter(loader)
        next(iterator)  # forks the workers with the switches in place
    finally:
        tar.plain_path, stream.pack_batch, Collator.__call__, ChatRenderer.__call__ = saved
    return loader, iterator


def ablation(urls: list[str], processor: Processor, workers: int, batches: int, rounds: int) -> dict[str, list]:
    """samples/s and CPU per sample of the four combinations, measured in turn within each round."""
    combos = {"both": (True, True, True), "no tar parser": (False, True, True), "no buffer pool": (True, False, True),
              "neither": (False, False, True), "no chat fast path": (True, True, False)}
    loaders = {}
    for name, switches in combos.items():
        dm = DataModule(processor, urls, format="conversation", batch_size=BATCH, num_workers=workers,
                        shuffle_buffer=1000, resampled=True, seed=0)
        loaders[name] = _switched_loader(dm, *switches)
    out: dict[str, list] = {name: [] for name in combos}
    for r in range(rounds):
        for name, (loader, iterator) in loaders.items():
            for _ in range(WARMUP_BATCHES):
                next(iterator)
            pids = [w.pid for w in getattr(loader._iterator, "_workers", [])]
            wall, cpu, worker_cpu = time.perf_counter(), time.process_time(), cpu_seconds(pids)
            n = sum(len(next(iterator)["keys"]) for _ in range(batches))
            used = time.process_time() - cpu + cpu_seconds(pids) - worker_cpu
            out[name].append((n / (time.perf_counter() - wall), used / n))
            print(f"  [ablate] round {r} {name:17s} {out[name][-1][0]:7.0f}/s  CPU {1e6 * used / n:6.0f} us/sample",
                  flush=True)
    return out


def chat_path_cost(urls: list[str], processor: Processor, rounds: int, samples: int = 200) -> dict[str, list[float]]:
    """CPU seconds per sample of the processor alone (records decoded beforehand, in this process) with the
    ChatRenderer fast path and with every render through `apply_chat_template`, in turn within each round."""
    from vlm.data.formats import to_record
    from vlm.data.processor import ChatRenderer
    from vlm.data.tar import iterate_samples

    records = []
    for sample in iterate_samples(urls[:1]):
        records.append(to_record(sample, "conversation"))
        if len(records) >= samples:
            break
    fast = ChatRenderer.__call__
    calls = {"fast path": fast,
             "apply_chat_template": lambda self, messages, add_generation_prompt=False: self.reference(
                 messages, add_generation_prompt)}
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            ChatRenderer.__call__ = call
            try:
                start = time.process_time()
                for record in records:
                    processor(record)
                out[name].append((time.process_time() - start) / len(records))
            finally:
                ChatRenderer.__call__ = fast
    return out


# ---------------------------------------------------------------- quickstart wait share


class WaitTimer(L.Callback):
    """Time between one batch's end and the next one's start (the fetch of the next batch plus its transfer)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.waits: list[float] = []
        self.steps: list[float] = []
        self._end: float | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._end is not None and batch_idx > self.warmup:
            self.waits.append(now - self._end)
        self._start = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._end = time.perf_counter()
        if batch_idx > self.warmup:
            self.steps.append(self._end - self._start)


def quickstart_share(data_dir: Path, stage: str, steps: int, extra: list[str]) -> dict[str, float]:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={data_dir}", f"stage={stage}", f"run_dir={data_dir}/run",
                                          "data.prepare.num_train=4000", "data.prepare.num_val=100",
                                          "data.prepare.num_test=100", "data.prepare.samples_per_shard=500", *extra])
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    instantiate(data_cfg.pop("prepare"))
    model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True))
    datamodule = instantiate(data_cfg)(processor=build_processor(model, tokenizer))
    module = instantiate(cfg.stage, model=model, optim=OmegaConf.to_container(cfg.optim, resolve=True),
                         _convert_="all")
    timer = WaitTimer(warmup=WARMUP_BATCHES)
    profiler = SimpleProfiler(dirpath=str(data_dir), filename=f"profile-{stage}")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(max_steps=steps, limit_val_batches=0, enable_progress_bar=False)
    trainer = instantiate(trainer_cfg, logger=False, callbacks=[timer], profiler=profiler,
                          enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    wait, step = sum(timer.waits), sum(timer.steps)
    fetch = profiler.recorded_durations.get("[_TrainingEpochLoop].train_dataloader_next", [])[WARMUP_BATCHES + 1:]
    batch = profiler.recorded_durations.get("run_training_batch", [])[WARMUP_BATCHES + 1:]
    return {"share": wait / (wait + step), "wait_ms": 1e3 * wait / len(timer.waits),
            "step_ms": 1e3 * step / len(timer.steps),
            "profiler_share": sum(fetch) / (sum(fetch) + sum(batch)) if fetch and batch else float("nan"),
            "workers": datamodule.num_workers, "batch": datamodule.batch_size}


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per round")
    parser.add_argument("--steps", type=int, default=40, help="training steps per quickstart stage")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: "
                        "torch's; on a busy 2-core machine 1 is far faster and steadier)")
    parser.add_argument("--skip", choices=["throughput", "quickstart"], action="append", default=[])
    parser.add_argument("--ablate", action="store_true", help="also measure the 384 px JPEG pipeline without our tar "
                        "parser and without the shared-memory buffer pool, side by side (keep-or-drop)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, float]] = {}
    ablated: dict[str, list] = {}
    chat: dict[str, dict[str, list[float]]] = {}
    shares: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shapes = ensure_shapes(tmp / "shapes", num_train=4000, num_val=100, num_test=100, samples_per_shard=500)
        if "throughput" not in args.skip:
            with initialize_config_dir(config_dir=CONF, version_base="1.3"):
                cfg = compose("train", overrides=[f"paths.data_dir={tmp}", "model=tiny_tiled"])
            model, tokenizer = load_model(OmegaConf.to_container(cfg.model, resolve=True))
            quick = build_processor(model, tokenizer)
            urls = [str(shapes / s) for s in (shapes / "train.txt").read_text().split()]
            results["quickstart 64px PNG -> 5x16"] = throughput("quickstart", urls, "png", quick, args.workers,
                                                              args.batches, args.rounds)
            tokenizer = load_tokenizer(str(shapes / "tokenizer"))
            large = Processor(tokenizer, ImageTransform(224, quick.image_transform.mean.flatten().tolist(),
                                                        quick.image_transform.std.flatten().tolist()),
                              tokens_per_image=64, max_length=512)
            jpegs = jpeg_shards(shapes, tmp / "jpeg", 384)
            results["384px JPEG -> 224"] = throughput("384px", jpegs, "jpg", large, args.workers, args.batches,
                                                      args.rounds)
        if args.ablate:
            tokenizer = load_tokenizer(str(shapes / "tokenizer"))
            jpegs = jpeg_shards(shapes, tmp / "jpeg", 384)
            large = Processor(tokenizer, ImageTransform(224, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]), tokens_per_image=64,
                              max_length=512)
            ablated = ablation(jpegs, large, args.workers, args.batches, args.rounds)
            with initialize_config_dir(config_dir=CONF, version_base="1.3"):
                cfg = compose("train", overrides=[f"paths.data_dir={tmp}", "model=tiny_tiled"])
            quick = build_processor(*load_model(OmegaConf.to_container(cfg.model, resolve=True)))
            pngs = [str(shapes / s) for s in (shapes / "train.txt").read_text().split()]
            chat = {"384px JPEG -> 224": chat_path_cost(jpegs, large, args.rounds),
                    "quickstart 64px PNG -> 5x16": chat_path_cost(pngs, quick, args.rounds)}
        if "quickstart" not in args.skip:
            # as conf/recipe/quickstart.yaml runs them (clip: its own model; the others: model=tiny_quadrants)
            quick_stages = {"clip": ["data.batch_size=64", "optim.lr=3e-3"],
                            "lm": ["model=tiny_quadrants", "optim.lr=1e-3"],
                            "align": ["model=tiny_quadrants", "optim.lr=1e-3"],
                            "sft": ["model=tiny_quadrants", "data.batch_size=64", "optim.lr=1e-3"]}
            for stage, extra in quick_stages.items():
                shares[stage] = quickstart_share(tmp, stage, args.steps, extra)
                print(f"  [quickstart {stage}] {shares[stage]}", flush=True)

    print(f"\n{torch.get_num_threads()} torch threads; batch {BATCH}; {args.workers} workers; medians of "
          f"{args.rounds} rounds")
    if results:
        print(f"{'images':28s} {'limit/s':>9s} {'full/s':>9s} {'ratio':>7s} {'0 workers/s':>12s}"
              f" | CPU/sample: {'limit':>8s} {'full':>8s} {'ratio':>6s}")
        for name, r in results.items():
            print(f"{name:28s} {r['limit']:9.0f} {r['full']:9.0f} {r['ratio']:7.2f} {r['inprocess']:12.0f}"
                  f" | {r['limit_cpu_us']:10.0f}us {r['full_cpu_us']:6.0f}us {r['cpu_ratio']:6.2f}"
                  "   target ratio >= 0.8")
        print("(ratio: wall-clock samples/s against limit x workers; CPU ratio: decode+resize CPU time against the "
              "full pipeline's, workers and main process together = the ratio with a free core per worker)")
    if ablated:
        base = [rate for rate, _ in ablated["both"]]
        print(f"\nkeep-or-drop, 384 px JPEG -> 224, {args.workers} workers (median of {args.rounds} rounds; per-round "
              "ratio to `both` measured in the same round)")
        for name, rows in ablated.items():
            rates = [rate for rate, _ in rows]
            ratios = [b / x for b, x in zip(base, rates)]
            cpu = 1e6 * statistics.median(c for _, c in rows)
            print(f"{name:17s} {statistics.median(rates):7.0f}/s  CPU {cpu:6.0f}"
                  f" us/sample  both/this per round: {' '.join(f'{x:.2f}' for x in ratios)}  median "
                  f"{statistics.median(ratios):.2f}")
    for images, costs in chat.items():
        medians = {name: 1e6 * statistics.median(values) for name, values in costs.items()}
        print(f"processor CPU per sample, {images}: " + ", ".join(f"{n} {v:.0f} us" for n, v in medians.items())
              + f" (fast path saves {medians['apply_chat_template'] - medians['fast path']:.0f} us)")
    if shares:
        print(f"\n{'quickstart stage':18s} {'wait/step':>10s} {'step':>9s} {'share':>7s} {'profiler':>9s}")
        for stage, s in shares.items():
            print(f"{stage:18s} {s['wait_ms']:8.1f}ms {s['step_ms']:7.1f}ms {100 * s['share']:6.1f}% "
                  f"{100 * s['profiler_share']:8.1f}%   target < 5%")


if __name__ == "__main__":
    main()
