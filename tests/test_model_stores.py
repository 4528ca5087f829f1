"""Models where people keep them: an Ollama store and a Hugging Face cache, laid out in a temporary home."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_model):
    """A home with Ollama's store (tiny:latest, someone/other:q8) and a Hugging Face cache (org/tiny-GGUF)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE", "LLAMA_CACHE"):
        monkeypatch.delenv(var, raising=False)
    data = tiny_model.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    ollama = tmp_path / ".ollama" / "models"
    (ollama / "blobs").mkdir(parents=True)
    blob = ollama / "blobs" / f"sha256-{digest}"
    blob.write_bytes(data)
    for manifest in ("registry.ollama.ai/library/tiny/latest", "registry.ollama.ai/someone/other/q8"):
        path = ollama / "manifests" / manifest
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"schemaVersion": 2, "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)}]}))
    repo = tmp_path / ".cache" / "huggingface" / "hub" / "models--org--tiny-GGUF"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copy(tiny_model, repo / "blobs" / digest)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    os.symlink(f"../../blobs/{digest}", snapshot / "tiny-Q4_K_M.gguf")
    return {"blob": blob, "hf": snapshot / "tiny-Q4_K_M.gguf"}


def test_models_lists_the_ollama_store_and_the_hugging_face_cache(cli, home):
    r = cli("models", "--json")
    assert r.code == 0, r.err
    found = {m["name"]: m for m in json.loads(r.out)}
    assert set(found) == {"ollama:tiny:latest", "ollama:someone/other:q8", "hf:org/tiny-GGUF:tiny-Q4_K_M"}
    assert {(m["architecture"], m["quant"]) for m in found.values()} == {("llama", "Q4_K_M")}
    assert found["ollama:tiny:latest"]["path"] == str(home["blob"])
    assert found["hf:org/tiny-GGUF:tiny-Q4_K_M"]["path"] == str(home["hf"])
    table = cli("models").out
    assert "ollama:tiny:latest" in table and "huggingface" in table


@pytest.mark.parametrize("name,key", [("ollama:tiny:latest", "blob"), ("ollama:tiny", "blob"),
                                      ("ollama:someone/other:q8", "blob"), ("hf:org/tiny-GGUF", "hf"),
                                      ("hf:org/tiny-GGUF:Q4_K_M", "hf"), ("hf:org/tiny-GGUF:q4_k_m", "hf")])
def test_inspect_resolves_store_names_to_the_same_file_as_its_path(cli, home, name, key):
    by_name = json.loads(cli("inspect", name, "--json").out)
    by_path = json.loads(cli("inspect", str(home[key]), "--json").out)
    assert by_name["path"] == str(home[key]) and by_name == by_path


@pytest.mark.parametrize("name,needles", [
    ("ollama:tiyn", ["ollama:tiyn resolves to no model file here", "close matches: ollama:tiny:latest"]),
    ("ollama:tiny:q4", ["resolves to no model file", "ollama:tiny:latest"]),
    ("hf:org/tiny-GGUF:Q8_0", ["resolves to no model file", "hf:org/tiny-GGUF"]),
    ("hf:nobody/nothing", ["resolves to no model file", "--download"]),
])
def test_a_name_that_resolves_to_nothing_is_one_line_with_close_matches(cli, home, name, needles):
    for command in ("inspect", "bench", "tune"):
        assert_one_line_error(cli(command, name), *needles)


def test_a_store_name_with_several_files_asks_for_the_quant(cli, home, tiny_model):
    other = Path(home["hf"]).parent / "tiny-Q8_0.gguf"
    shutil.copy(tiny_model, other)
    assert_one_line_error(cli("inspect", "hf:org/tiny-GGUF"), "matches 2 cached files", "add :QUANT")
    assert json.loads(cli("inspect", "hf:org/tiny-GGUF:Q8_0", "--json").out)["path"] == str(other)
