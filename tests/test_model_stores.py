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


class FakeHub:
    """huggingface_hub's list_repo_files and snapshot_download without a network: the hub holds ``files``
    (name -> the bytes), and a download lays the asked-for ones out in the cache as the real client does."""

    def __init__(self, files: dict[str, bytes], error: Exception | None = None):
        self.files, self.error, self.downloads = files, error, []

    def list_repo_files(self, repo_id, **kw):
        if self.error is not None:
            raise self.error
        return [*self.files, "README.md"]

    def snapshot_download(self, repo_id, *, cache_dir, allow_patterns, **kw):
        if self.error is not None:
            raise self.error
        self.downloads.append(sorted(allow_patterns))
        repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        for name in allow_patterns:
            data = self.files[name]
            digest = hashlib.sha256(data).hexdigest()
            (repo / "blobs").mkdir(parents=True, exist_ok=True)
            (repo / "blobs" / digest).write_bytes(data)
            link = repo / "snapshots" / COMMIT / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(repo / "blobs" / digest, link.parent), link)
        return str(repo / "snapshots" / COMMIT)


@pytest.fixture
def hub(monkeypatch, tiny_model):
    def install(files: dict[str, bytes], error: Exception | None = None) -> FakeHub:
        import huggingface_hub

        fake = FakeHub(files, error)
        monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
        return fake

    return install


def test_download_fetches_a_quant_the_cache_lacks_though_another_is_cached(cli, home, hub, tiny_model):
    fake = hub({"tiny-Q4_K_M.gguf": tiny_model.read_bytes(), "tiny-Q8_0.gguf": tiny_model.read_bytes()})
    assert_one_line_error(cli("inspect", "hf:org/tiny-GGUF:Q8_0"), "resolves to no model file", "--download")
    assert fake.downloads == []  # nothing is fetched unless asked
    r = cli("inspect", "hf:org/tiny-GGUF:q8_0", "--download", "--json")
    assert r.code == 0, r.err
    assert fake.downloads == [["tiny-Q8_0.gguf"]]  # that quant only
    assert json.loads(r.out)["path"] == str(Path(home["hf"]).parent / "tiny-Q8_0.gguf")
    again = cli("inspect", "hf:org/tiny-GGUF:Q4_K_M", "--download", "--json")
    assert json.loads(again.out)["path"] == str(home["hf"]) and len(fake.downloads) == 1  # cached: not fetched


def test_download_fetches_every_shard_of_a_split_model(cli, home, hub, tmp_path):
    from llama_tuner.model.twins import SHAPES, write_synthetic_gguf

    write_synthetic_gguf(tmp_path / "tiny-Q4_0.gguf", SHAPES["tiny"], "q4_0", shards=2)
    shards = {f"Q4_0/{p.name}": p.read_bytes() for p in sorted(tmp_path.glob("tiny-Q4_0-*.gguf"))}
    fake = hub({"tiny-Q4_K_M.gguf": b"", **shards})
    r = cli("inspect", "hf:org/tiny-GGUF:Q4_0", "--download", "--json")
    assert r.code == 0, r.err
    assert fake.downloads == [sorted(shards)]
    d = json.loads(r.out)
    assert d["path"].endswith("Q4_0/tiny-Q4_0-00001-of-00002.gguf") and len(d["files"]) == 2
    assert d["file_size"] == sum(len(b) for b in shards.values())


def _http_error(cls, status: int):
    import httpx2

    url = "https://huggingface.co/api/models/org/nothing"
    return cls(f"{status} Client Error. Repository Not Found for url: {url}.\nmore lines",
               response=httpx2.Response(status, request=httpx2.Request("GET", url)))


@pytest.mark.parametrize("spec", ["hf:org/tiny-GGUF:Q8_0", "hf:org/other-GGUF:Q8_0"])  # another quant cached, none
@pytest.mark.parametrize("error,needles", [
    ("missing", ["no repository org/", "hf auth login"]),
    ("gated", ["is gated", "accept them"]),
    ("network", ["could not fetch hf:org/", "all connection attempts failed", "network"]),
    ("offline", ["could not fetch", "offline", "HF_HUB_OFFLINE"]),
])
def test_hub_errors_are_one_line(cli, home, hub, error, needles, spec):
    import httpx2
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    exc = {"missing": lambda: _http_error(RepositoryNotFoundError, 404),
           "gated": lambda: _http_error(GatedRepoError, 401),
           "network": lambda: httpx2.ConnectError("All connection attempts failed"),
           "offline": lambda: OfflineModeIsEnabled("Cannot reach the hub: offline mode is enabled.")}[error]()
    hub({}, error=exc)
    assert_one_line_error(cli("inspect", spec, "--download"), *needles)


def test_download_names_the_hubs_files_when_none_or_several_match(cli, home, hub):
    fake = hub({"tiny-Q4_K_M.gguf": b"", "tiny-Q5_K_M.gguf": b"", "tiny-Q5_K_S.gguf": b""})
    assert_one_line_error(cli("inspect", "hf:org/tiny-GGUF:Q6_K", "--download"),
                          "no GGUF file of org/tiny-GGUF", "tiny-Q5_K_M, tiny-Q5_K_S")
    assert_one_line_error(cli("inspect", "hf:org/tiny-GGUF:Q5_K", "--download"), "matches 2 GGUF files",
                          "hf:org/tiny-GGUF:tiny-Q5_K_S", "a longer one")
    assert fake.downloads == []  # nothing fetched when the name does not pick one file
