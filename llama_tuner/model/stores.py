"""Models where people already keep them: Ollama's store, the Hugging Face cache, llama.cpp's cache, LM Studio.

``tune``, ``bench`` and ``inspect`` take ``ollama:NAME[:TAG]`` and ``hf:ORG/REPO[:QUANT]`` as
well as paths; :func:`resolve_model` turns them into the GGUF file on disk (the first shard of
a split GGUF). Nothing is downloaded unless asked (``download=True``, the Hugging Face hub
only): then a name that no cached file matches is fetched, the one GGUF file (every shard of
it) of the repository whose name holds QUANT.

- Ollama (``$OLLAMA_MODELS`` or ``~/.ollama/models``): a manifest
  ``manifests/<registry>/<namespace>/<name>/<tag>`` names its layers; the one of media
  type ``application/vnd.ollama.image.model`` is the GGUF, ``blobs/sha256-<hex>``.
- Hugging Face (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
  read through ``huggingface_hub.scan_cache_dir``.
- llama.cpp's own cache (``$LLAMA_CACHE`` or ``~/.cache/llama.cpp``) and LM Studio's models
  folders (``~/.lmstudio/models``, ``~/.cache/lm-studio/models``): GGUF files as they lie.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from llama_tuner.errors import UserError
from llama_tuner.model.gguf_header import SPLIT_NAME

OLLAMA_REGISTRY, OLLAMA_NAMESPACE = "registry.ollama.ai", "library"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


@dataclass(frozen=True, kw_only=True)
class StoredModel:
    """A GGUF file found in a model store, and the name that asks for it."""

    source: str  # ollama, huggingface, llama.cpp, lm-studio
    name: str  # what tune, bench and inspect accept: ollama:NAME:TAG, hf:ORG/REPO:FILE, or the path
    path: Path
    size: int


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def ollama_root() -> Path:
    """Ollama's model store."""
    return Path(os.environ.get("OLLAMA_MODELS") or _home() / ".ollama" / "models")


def hf_cache() -> Path:
    """The Hugging Face hub cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or _home() / ".cache" / "huggingface") / "hub"


def plain_folders() -> dict[str, list[Path]]:
    """Stores that keep GGUF files as they are: llama.cpp's cache and LM Studio's folders."""
    llama = Path(os.environ.get("LLAMA_CACHE") or _home() / ".cache" / "llama.cpp")
    studio = [_home() / ".lmstudio" / "models", _home() / ".cache" / "lm-studio" / "models"]
    return {"llama.cpp": [llama], "lm-studio": studio}


def _ollama_name(manifest: Path, root: Path) -> str:
    registry, namespace, name, tag = manifest.relative_to(root / "manifests").parts[-4:]
    if registry == OLLAMA_REGISTRY:
        return f"{name}:{tag}" if namespace == OLLAMA_NAMESPACE else f"{namespace}/{name}:{tag}"
    return f"{registry}/{namespace}/{name}:{tag}"


def _ollama_blob(manifest: Path, root: Path) -> Path | None:
    try:
        layers = json.loads(manifest.read_text()).get("layers", [])
    except (OSError, ValueError):
        return None
    layer = next((x for x in layers if x.get("mediaType") == OLLAMA_MODEL_LAYER), None)
    if layer is None or not str(layer.get("digest", "")).startswith("sha256:"):
        return None
    blob = root / "blobs" / layer["digest"].replace(":", "-")
    return blob if blob.is_file() else None


def ollama_models(root: Path | None = None) -> list[StoredModel]:
    """The models of an Ollama store whose model layer is on disk."""
    root = root or ollama_root()
    out = []
    for manifest in sorted((root / "manifests").glob("*/*/*/*")):
        blob = _ollama_blob(manifest, root) if manifest.is_file() else None
        if blob is not None:
            out.append(StoredModel(source="ollama", name=f"ollama:{_ollama_name(manifest, root)}", path=blob,
                                   size=blob.stat().st_size))
    return out


def _hf_files(cache: Path) -> dict[str, list[Path]]:
    """Repository id -> its cached GGUF files (first shards only), newest revision first."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(cache)
    except (CacheNotFound, OSError):
        return {}
    out: dict[str, list[Path]] = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: ("main" not in r.refs, -r.last_modified))
        for rev in revisions:
            files = sorted(Path(f.file_path) for f in rev.files
                           if f.file_name.endswith(".gguf") and _first_or_only(f.file_name))
            if files:
                out[repo.repo_id] = files
                break
    return out


def hf_models(cache: Path | None = None) -> list[StoredModel]:
    """The GGUF files of the Hugging Face cache."""
    out = []
    for repo, files in sorted(_hf_files(cache or hf_cache()).items()):
        for f in files:
            out.append(StoredModel(source="huggingface", name=f"hf:{repo}:{f.name.removesuffix('.gguf')}", path=f,
                                   size=f.stat().st_size))
    return out


def _first_or_only(name: str) -> bool:
    """True for a GGUF file that is a model by itself or the first shard of a split one (the one to load)."""
    shard = SPLIT_NAME.search(name)  # llama.cpp loads a split GGUF by its first shard
    return shard is None or shard.group(1) == "00001"


def find_models() -> list[StoredModel]:
    """Every GGUF model in the stores this machine has (a split GGUF as its first shard)."""
    found = ollama_models() + hf_models()
    for source, folders in plain_folders().items():
        for folder in folders:
            found += [StoredModel(source=source, name=str(p), path=p, size=p.stat().st_size)
                      for p in sorted(folder.rglob("*.gguf")) if p.is_file() and _first_or_only(p.name)]
    return found


def _unresolved(spec: str, known: list[str], fix: str) -> UserError:
    close = difflib.get_close_matches(spec, known, n=5, cutoff=0.4)
    hint = f"close matches: {', '.join(close)}; or {fix}" if close else fix
    return UserError(f"{spec} resolves to no model file here", hint)


def _resolve_ollama(spec: str) -> str:
    name, _, tag = spec.removeprefix("ollama:").partition(":")
    parts = name.split("/")
    defaults = [OLLAMA_REGISTRY, OLLAMA_NAMESPACE][:max(0, 3 - len(parts))]
    registry, namespace, model = (defaults + parts)[-3:]
    root = ollama_root()
    blob = _ollama_blob(root / "manifests" / registry / namespace / model / (tag or "latest"), root)
    if blob is None:
        known = [m.name for m in ollama_models(root)]
        raise _unresolved(spec, known, f"`ollama pull {name}`, or see `llama-tuner models`")
    return str(blob)


def _matching(files: list[Path], quant: str) -> list[Path]:
    return [f for f in files if not quant or quant.lower() in f.name.lower()]


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What the hub's client raises for a network or server failure (over requests, httpx or httpx2, by its
    version)."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    errors: list[type[BaseException]] = [OSError, ValueError, HfHubHTTPError, EntryNotFoundError]
    for module, name in (("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_error(spec: str, repo: str, exc: BaseException) -> UserError:
    """A failure of the Hugging Face hub as one line that says what to do."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return UserError(f"{repo} on the Hugging Face hub is gated: {spec} needs its terms accepted",
                         f"accept them on https://huggingface.co/{repo}, then log in with `hf auth login`")
    if isinstance(exc, RepositoryNotFoundError):
        return UserError(f"the Hugging Face hub has no repository {repo} (or it is private)",
                         "check the name on huggingface.co, or log in with `hf auth login`")
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return UserError(f"could not fetch {spec} from the Hugging Face hub: {detail}",
                     "check the network (or HF_HUB_OFFLINE, HF_ENDPOINT, a proxy) and try again, "
                     "or download the file and pass its path")


def _shard_names(name: str) -> list[str]:
    """Every shard of the split GGUF whose first shard is ``name`` (``name`` alone if it is not split)."""
    split = SPLIT_NAME.search(name)
    if split is None:
        return [name]
    count = int(split.group(2))
    return [f"{name[:split.start()]}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def _download_hf(spec: str, repo: str, quant: str) -> None:
    """Fetch into the cache the one GGUF model of ``repo`` whose file name holds ``quant`` (every shard of a
    split one), asking the hub first which files it has so that nothing else is downloaded.

    Raises:
        UserError: the hub cannot be reached or refuses; no file, or several, match ``quant``.
    """
    import huggingface_hub

    errors = _hub_errors()
    try:
        names = [n for n in huggingface_hub.list_repo_files(repo) if n.endswith(".gguf")]
    except errors as exc:
        raise _hub_error(spec, repo, exc) from None
    models = [n for n in names if _first_or_only(Path(n).name) and _matching([Path(n)], quant)]
    if not models:
        quants = ", ".join(Path(n).name.removesuffix(".gguf") for n in names if _first_or_only(Path(n).name))
        raise UserError(f"no GGUF file of {repo} on the Hugging Face hub matches {spec}",
                        f"its GGUF files: {quants}" if quants else "the repository holds no .gguf file")
    if len(models) > 1:
        listed = ", ".join(f"hf:{repo}:{Path(n).name.removesuffix('.gguf')}" for n in models)
        raise UserError(f"{spec} matches {len(models)} GGUF files on the Hugging Face hub: {listed}",
                        "add :QUANT (or a longer one) to pick one")
    [first] = models
    wanted = _shard_names(first)
    missing = [n for n in wanted if n not in names]
    if missing:
        raise UserError(f"{repo} on the Hugging Face hub lacks {missing[0]}, a shard of {first}",
                        "download the shards it has yourself, or pick another quant")
    try:
        huggingface_hub.snapshot_download(repo, cache_dir=hf_cache(), allow_patterns=wanted)
    except errors as exc:
        raise _hub_error(spec, repo, exc) from None


def _resolve_hf(spec: str, download: bool) -> str:
    repo, _, quant = spec.removeprefix("hf:").partition(":")
    wanted = _matching(_hf_files(hf_cache()).get(repo, []), quant)
    if not wanted and download:
        _download_hf(spec, repo, quant)
        wanted = _matching(_hf_files(hf_cache()).get(repo, []), quant)
    if len(wanted) == 1:
        return str(wanted[0])
    if len(wanted) > 1:
        names = ", ".join(f"hf:{repo}:{f.name.removesuffix('.gguf')}" for f in wanted)
        raise UserError(f"{spec} matches {len(wanted)} cached files: {names}", "add :QUANT to pick one")
    known = [m.name for m in hf_models()] + [f"hf:{r}" for r in _hf_files(hf_cache())]
    raise _unresolved(spec, known, "pass --download to fetch it, or see `llama-tuner models`")


def resolve_model(spec: str, *, download: bool = False) -> str:
    """The GGUF path that ``spec`` names: ``ollama:NAME[:TAG]``, ``hf:ORG/REPO[:QUANT]`` or a path (as is).
    With ``download``, an ``hf:`` name that no cached file matches is fetched from the hub first (even when
    another quant of the repository is cached).

    Raises:
        UserError: the name resolves to nothing here (the message lists close matches), or to several files;
            with ``download``, the hub cannot be reached or refuses, or has no file (or several) matching it.
    """
    if spec.startswith("ollama:"):
        return _resolve_ollama(spec)
    if spec.startswith("hf:"):
        return _resolve_hf(spec, download)
    return spec
