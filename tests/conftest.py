"""Shared test settings and fixtures.

Nothing may reach a model hub, and torch stays on few threads. The fixtures build what many modules need once per
session: the shapes world (`make_shapes`, `shapes`, `tiny_shapes`), and compose the project's configs (`compose_config`,
which takes the `debug=` presets of conf/debug/ like the command line does). Logging state is put back after every
test: a Hydra run inside a test applies its logging config, which may disable every logger that exists then.
"""
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# The two shapes worlds most modules train on: enough for a few steps of every stage, built once per session.
SHAPES = {"num_train": 200, "num_val": 20, "num_test": 20, "samples_per_shard": 100}
TINY_SHAPES = {"num_train": 4, "num_val": 2, "num_test": 2, "samples_per_shard": 4}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Every logger's level, handlers, `disabled` and `propagate` as before the test (and the root's); a logger
    created during the test is switched back on (a logging config applied after its creation may have disabled it)."""
    manager = logging.root.manager

    def loggers() -> list[logging.Logger]:
        return [logging.root, *(lg for lg in list(manager.loggerDict.values()) if isinstance(lg, logging.Logger))]

    saved = {id(lg): (lg, lg.level, list(lg.handlers), lg.disabled, lg.propagate) for lg in loggers()}
    disable = manager.disable
    yield
    for logger in loggers():
        if id(logger) not in saved:
            logger.disabled = False
    for logger, level, handlers, disabled, propagate in saved.values():
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.disabled, logger.propagate = disabled, propagate
    logging.disable(disable)


class Records(logging.Handler):
    """Keeps the records it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


@pytest.fixture
def vlm_warnings() -> Iterator[Records]:
    """Warnings of our `vlm` loggers, collected by a handler on `vlm` itself (restore_logging removes it after)."""
    handler, logger = Records(), logging.getLogger("vlm")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield handler


@pytest.fixture(scope="session")
def make_shapes(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make_shapes(**sizes)` -> the root of a shapes world (shards + tokenizer) of those sizes, built once per
    session and shared: tests read it, they never write into it (copy it first)."""
    from vlm.data.synthetic.shapes import ensure_shapes

    built: dict[tuple, Path] = {}

    def make(**sizes) -> Path:
        key = tuple(sorted(sizes.items()))
        if key not in built:
            built[key] = ensure_shapes(tmp_path_factory.mktemp("data") / "shapes", **sizes)
        return built[key]

    return make


@pytest.fixture(scope="session")
def shapes(make_shapes) -> Path:
    """200 training samples (2 shards), 20 val, 20 test, with its tokenizer."""
    return make_shapes(**SHAPES)


@pytest.fixture(scope="session")
def tiny_shapes(make_shapes) -> Path:
    """4 training samples, 2 val, 2 test: a tokenizer and a few images for the inference tools."""
    return make_shapes(**TINY_SHAPES)


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_shapes) -> Iterator[dict[str, Path]]:
    """A random tiny model directory on a shapes tokenizer, saved once per module: {"root": the data dir (its
    shapes/ has 4 test pictures), "shapes", "model", "image": a red 16 px picture}."""
    from PIL import Image
    from test_generation import tiny_vlm

    shapes = make_shapes(num_train=4, num_val=2, num_test=4, samples_per_shard=4)
    root = tmp_path_factory.mktemp("world")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = tiny_vlm(shapes / "tokenizer")
    model_dir = model.save_pretrained(root / "model", tokenizer)
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "red.png")
    yield {"root": shapes.parent, "shapes": shapes, "model": model_dir, "image": root / "red.png"}
    torch.set_num_threads(before)


def _compose(config: str = "train", overrides: Sequence[str] = (), return_hydra_config: bool = False):
    """conf/<config>.yaml + overrides, as the command line composes it (`debug=tiny` works too)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides), return_hydra_config=return_hydra_config)


@pytest.fixture(scope="session")
def compose_config() -> Callable:
    """`compose_config(config="train", overrides=(), return_hydra_config=False)`: a config of conf/ as the command
    line composes it, without writing out Hydra's initialize/compose in each test."""
    return _compose
