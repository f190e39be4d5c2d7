"""The fast tar reader gives webdataset's samples and skips exactly, on regular and on broken shards."""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tarfile_samples

import vlm.data.tar as tar_reader
from vlm.data.skips import SkipCounter
from vlm.data.tar import tar_files


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **extra) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.mtime = 1_700_000_000.5
    for key, value in extra.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _members(tar: tarfile.TarFile, tag: str) -> None:
    long_dir = "d" * 80 + "/" + "e" * 60  # over 100 characters: GNU long name, ustar prefix or pax path
    _add(tar, "dir", kind=tarfile.DIRTYPE)
    _add(tar, f"{tag}0.txt", b"first " + tag.encode())
    _add(tar, f"{tag}0.JSON", b'{"a": 1}')
    _add(tar, f"{tag}0.png", bytes(range(256)) * 3)
    _add(tar, "__meta__", b"skipped by webdataset")
    _add(tar, "x/__cache__/y.txt", b"skipped by the meta pattern")
    _add(tar, "link", kind=tarfile.SYMTYPE, linkname=f"{tag}0.txt")
    _add(tar, f"{long_dir}/{tag}1.txt", b"")  # empty member
    _add(tar, f"{long_dir}/{tag}1.cls", b"7")
    _add(tar, f"sub/{tag}2.txt", "ünïcode".encode() * 100)
    _add(tar, f"sub/{tag}2.seg.png", b"\x00" * 512)  # multi-dot extension, data exactly one block


def _write(path: Path, fmt: int, tag: str) -> str:
    with tarfile.open(path, "w", format=fmt) as tar:
        _members(tar, tag)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tars")
    out = {
        "gnu": _write(root / "gnu.tar", tarfile.GNU_FORMAT, "g"),
        "ustar": _write(root / "ustar.tar", tarfile.USTAR_FORMAT, "u"),
        "pax": _write(root / "pax.tar", tarfile.PAX_FORMAT, "p"),
    }
    with wds.TarWriter(str(root / "writer.tar")) as sink:  # what our converters write (pax headers for mtime)
        for i in range(5):
            sink.write({"__key__": f"s{i:03d}", "txt": f"caption {i}".encode(), "jpg": bytes([i]) * (700 + i)})
    out["writer"] = str(root / "writer.tar")
    data = Path(out["gnu"]).read_bytes()
    (root / "gz.tar.gz").write_bytes(gzip.compress(data))
    out["gzip"] = str(root / "gz.tar.gz")
    (root / "empty.tar").write_bytes(b"")
    out["empty"] = str(root / "empty.tar")
    (root / "cut_data.tar").write_bytes(data[: 512 * 9 + 100])  # inside a member's data
    out["cut_data"] = str(root / "cut_data.tar")
    (root / "cut_header.tar").write_bytes(data[: 512 * 6 + 300])  # inside a header
    out["cut_header"] = str(root / "cut_header.tar")
    broken = bytearray(Path(out["writer"]).read_bytes())
    with tarfile.open(out["writer"]) as tar:
        fourth = tar.getmembers()[3].offset  # its (pax) header
    broken[fourth + 10] ^= 0x55  # a later member's name: its checksum fails
    (root / "bad_checksum.tar").write_bytes(bytes(broken))
    out["bad_checksum"] = str(root / "bad_checksum.tar")
    spaces = bytearray(Path(out["ustar"]).read_bytes())
    with tarfile.open(out["ustar"]) as tar:
        start = tar.getmembers()[2].offset  # the header of a regular member
    spaces[start + 100 : start + 108] = b"   644 \x00"  # an old-style numeric field, valid
    bad = bytearray(spaces)
    bad[start + 100 : start + 108] = b"  6 44 \x00"  # one tarfile rejects
    for buf in (spaces, bad):
        buf[start + 148 : start + 156] = b"        "
        buf[start + 148 : start + 156] = b"%06o\x00 " % sum(buf[start : start + 512])
    (root / "spaces.tar").write_bytes(bytes(spaces))
    (root / "bad_field.tar").write_bytes(bytes(bad))
    out["spaces"], out["bad_field"] = str(root / "spaces.tar"), str(root / "bad_field.tar")
    out["missing"] = str(root / "missing.tar")
    return out


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, exn: Exception) -> bool:
        self.seen.append(type(exn).__name__)
        return True


def _both(urls: list[str]) -> tuple[list, list, list, list]:
    ours, theirs = _Recorder(), _Recorder()
    fast = list(group_by_keys(tar_files(urls, ours), handler=ours))
    reference = list(tarfile_samples((dict(url=u) for u in urls), handler=theirs))
    return fast, reference, ours.seen, theirs.seen


REGULAR = ["gnu", "ustar", "pax", "writer", "spaces"]
FALLBACK = ["gzip", "missing"]  # left to webdataset: compressed, or not openable here
BROKEN = ["empty", "cut_data", "cut_header", "bad_checksum", "bad_field"]  # webdataset ends some of them silently


@pytest.mark.parametrize("name", REGULAR + ["gzip"])
def test_same_samples_as_webdataset(shards, name, monkeypatch) -> None:
    fallbacks = []
    real = tar_reader.tar_file_expander
    monkeypatch.setattr(tar_reader, "tar_file_expander", lambda *a, **k: fallbacks.append(1) or real(*a, **k))
    fast, reference, ours, theirs = _both([shards[name]])
    assert fast == reference
    assert ours == theirs == []
    assert len(fallbacks) == (name == "gzip")  # regular shards never touch tarfile
    assert len(fast) >= 3


@pytest.mark.parametrize("name", BROKEN + ["missing"])
def test_a_broken_shard_is_counted_once_and_its_cut_sample_dropped(shards, name) -> None:
    """Each broken shard is one counted error naming the shard; the samples before the break are webdataset's,
    and the one being read when it broke is dropped, not used half-complete (webdataset yields it, or ends
    silently at a bad header or a header cut short)."""
    fast, reference, ours, _ = _both([shards[name]])
    assert ours == ["ShardReadError"]
    assert fast == reference[: len(fast)] and len(reference) - len(fast) <= 1
    complete = {"g0": {"txt", "json", "png"}, "s000": {"txt", "jpg"}}
    for sample in fast:
        assert complete.get(sample["__key__"], set()) <= set(sample)


def test_a_cut_sample_is_dropped(shards) -> None:
    fast, reference, _, _ = _both([shards["cut_header"]])
    assert reference and set(reference[-1]) == {"__key__", "__url__", "txt", "json"}  # webdataset: no png
    assert [s["__key__"] for s in fast] == [s["__key__"] for s in reference[:-1]]


def test_errors_name_the_shard(shards) -> None:
    counter = SkipCounter()
    failed: set[str] = set()
    urls = [shards[n] for n in BROKEN + ["writer"]]
    samples = list(tar_reader.raw_samples(urls, counter, failed=failed))
    assert counter.counts() == {"read_error": len(BROKEN)}
    assert [s["__key__"] for s in samples][-5:] == [f"s{i:03d}" for i in range(5)]
    assert failed == {shards["empty"]}  # nothing read from it: a resampled stream does not draw it again


def test_a_stream_of_mixed_shards(shards) -> None:
    urls = [shards[n] for n in ["writer", "cut_data", "gnu", "missing", "bad_checksum", "pax", "empty", "writer"]]
    fast, reference, ours, theirs = _both(urls)
    assert len(ours) == 4 and set(ours) == {"ShardReadError"}
    keys = [s["__key__"] for s in fast]
    assert keys[:5] == [f"s{i:03d}" for i in range(5)] and keys[-5:] == keys[:5]
    assert {"txt", "json", "png"} <= set(next(s for s in fast if s["__key__"] == "g0"))
    # webdataset, which yields no end marker after a broken shard, merges cut_data's g0 with gnu's (a duplicate
    # file error); here the sample being read when cut_data broke is dropped, and gnu's g0 is whole and its own
    assert [s["__url__"] for s in fast if s["__key__"] == "g0"] == [shards["gnu"]]


def test_raw_samples_reads_through_the_fast_reader(shards, monkeypatch) -> None:
    monkeypatch.setattr(tar_reader, "tar_file_expander", lambda *a, **k: pytest.fail("fell back to tarfile"))
    counter = SkipCounter()
    samples = list(tar_reader.raw_samples([shards["writer"], shards["pax"]], counter))
    assert [s["__key__"] for s in samples[:5]] == [f"s{i:03d}" for i in range(5)]
    assert samples[0]["jpg"] == b"\x00" * 700 and not counter.counts()
