"""Split GGUFs (llama.cpp's gguf-split: NAME-00001-of-0000N.gguf and its siblings): sized, hashed and loaded whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from gguf import GGUFReader

from conftest import assert_one_line_error
from llama_tuner.errors import UserError
from llama_tuner.measure.environment import model_sha256
from llama_tuner.model.gguf_header import read_gguf_header
from llama_tuner.model.info import load_model_info
from llama_tuner.model.twins import SHAPES, write_synthetic_gguf


@pytest.fixture
def split_model(tmp_path, tiny_model):
    """The tiny model (same shape, quant and seed) written as 3 shards; returns the shards in order."""
    first = write_synthetic_gguf(tmp_path / "tiny-q4_k_m.gguf", SHAPES["tiny"], "q4_k_m", shards=3)
    shards = sorted(tmp_path.glob("tiny-q4_k_m-*-of-00003.gguf"))
    assert first == shards[0] and first.name == "tiny-q4_k_m-00001-of-00003.gguf" and len(shards) == 3
    return shards


def test_the_shards_are_as_gguf_split_writes_them(split_model, tiny_model):
    readers = [GGUFReader(s) for s in split_model]
    assert [r.fields["split.no"].contents() for r in readers] == [0, 1, 2]
    assert {r.fields["split.count"].contents() for r in readers} == {3}
    assert all(len(r.tensors) for r in readers)  # every shard holds tensors
    assert "llama.block_count" in readers[0].fields and "llama.block_count" not in readers[1].fields
    names = [t.name for r in readers for t in r.tensors]
    assert names == [t.name for t in GGUFReader(tiny_model).tensors]


def test_a_split_model_is_sized_from_every_shard(split_model, tiny_model):
    whole, split = load_model_info(tiny_model), load_model_info(split_model[0])
    assert split.layer_bytes == whole.layer_bytes and split.n_params == whole.n_params
    assert (split.output_bytes, split.token_embd_bytes) == (whole.output_bytes, whole.token_embd_bytes)
    assert split.tensor_types == whole.tensor_types
    assert split.file_size == sum(os.path.getsize(s) for s in split_model) > os.path.getsize(split_model[0])
    assert split.files == [str(s) for s in split_model]
    header = read_gguf_header(split_model[0])
    assert [t.shard for t in header.tensors] == sorted(t.shard for t in header.tensors)
    assert {t.shard for t in header.tensors} == {0, 1, 2}
    assert [(t.name, t.n_bytes) for t in header.tensors] == [(t.name, t.n_bytes)
                                                             for t in read_gguf_header(tiny_model).tensors]


def test_inspect_and_models_show_the_whole_split_model(cli, split_model, tiny_model, tmp_path, monkeypatch):
    d = json.loads(cli("inspect", split_model[0], "--json").out)
    assert d["file_size"] == sum(os.path.getsize(s) for s in split_model)
    assert d["layer_bytes"] == load_model_info(tiny_model).layer_bytes and len(d["files"]) == 3
    assert "in 3 files: a split GGUF" in cli("inspect", split_model[0]).out
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for var in ("OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LLAMA_CACHE", str(split_model[0].parent))
    found = json.loads(cli("models", "--json").out)
    assert [m["path"] for m in found] == [str(split_model[0])]  # one model, not three
    assert found[0]["size"] == sum(os.path.getsize(s) for s in split_model)


def test_a_missing_shard_or_a_later_shard_is_one_line(cli, split_model):
    assert_one_line_error(cli("inspect", split_model[1]), "shard 2 of 3", "pass the first shard",
                          split_model[0].name)
    split_model[2].unlink()
    for command in ("inspect", "bench"):
        assert_one_line_error(cli(command, split_model[0]), "missing", split_model[2].name)
    with pytest.raises(UserError, match=split_model[2].name):
        model_sha256(split_model[0])


def test_the_hash_covers_every_shard(split_model, tmp_path):
    cache = tmp_path / "hashes.json"
    digest = model_sha256(split_model[0], cache)
    shard_digests = "".join(hashlib.sha256(s.read_bytes()).hexdigest() for s in split_model)
    assert digest == hashlib.sha256(shard_digests.encode()).hexdigest()
    assert digest != hashlib.sha256(split_model[0].read_bytes()).hexdigest()
    data = bytearray(split_model[-1].read_bytes())
    data[-1] ^= 0xFF  # one byte of the last shard's last tensor
    split_model[-1].write_bytes(bytes(data))
    assert model_sha256(split_model[0], cache) != digest
    assert model_sha256(split_model[0], cache) == model_sha256(split_model[0], tmp_path / "fresh.json")


def test_a_renamed_first_shard_says_llama_cpp_finds_shards_by_name(cli, split_model, tmp_path):
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(split_model[0], renamed)
    assert_one_line_error(cli("inspect", renamed), "-00001-of-00003.gguf", "by name")


@pytest.mark.slow
def test_llama_cpp_loads_the_split_model_from_its_first_shard(split_model):
    from test_measure import FAST, measure

    from llama_tuner.measure.config import BenchConfig
    from llama_tuner.measure.result import Status

    [r] = measure(split_model[0], [BenchConfig(**FAST)])
    assert r.status == Status.OK, r.reason
    header = read_gguf_header(split_model[0])
    # llama.cpp's own count of what it loaded (llama_model_size, llama_model_n_params) is every shard's
    assert r.loaded_model["size"] == sum(t.n_bytes for t in header.tensors)
    assert r.loaded_model["n_params"] == load_model_info(split_model[0]).n_params
