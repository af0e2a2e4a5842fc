"""data_prep.files: a file is replaced whole or left as it was; SHA-256 read in blocks."""

from __future__ import annotations

import hashlib

import pytest

from data_prep import files


def test_a_write_replaces_the_file_and_leaves_no_temporary_one(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    files.write_text_atomically(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.replaced_atomically(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_the_temporary_name_is_hidden_beside_the_file_with_its_suffix(tmp_path):
    with files.replaced_atomically(tmp_path / "summary.png") as tmp:
        tmp.write_bytes(b"png")
        assert tmp.parent == tmp_path and tmp.name.startswith(".summary.png.") and tmp.suffix == ".png"


def test_sha256_in_blocks_is_that_of_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "HASH_BLOCK_BYTES", 7)
    data = bytes(range(256)) * 3
    (tmp_path / "shard").write_bytes(data)
    assert files.file_sha256(tmp_path / "shard") == hashlib.sha256(data).hexdigest()
