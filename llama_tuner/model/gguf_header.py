"""Read a GGUF file's header (metadata and tensor table) quickly, with clear errors.

``gguf.GGUFReader`` builds a numpy view per vocabulary string, which takes about
11 s for Gemma 3's 262k-token vocabulary and reports a truncated file as a numpy
reshape error. This parser walks the same format (it uses the ``gguf`` package's
type enums and block sizes), skips large arrays without materialising them, and
turns every damaged-file case into a :class:`~llama_tuner.errors.UserError` that names
the file and the fix.

A split GGUF (llama.cpp's gguf-split: ``NAME-00001-of-0000N.gguf`` and its siblings, each a
GGUF, the first holding the metadata and every one ``split.no``, ``split.count`` and
``split.tensors.count``) is read whole: :func:`read_gguf_header` given the first shard returns
the tensor table of every shard and the bytes of all of them, as llama.cpp loads it.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from llama_tuner.errors import UserError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Arrays longer than this (vocabularies, merges) are kept as their length only.
MAX_MATERIALISED_ARRAY = 4096
# Split GGUFs (llama.cpp's gguf-split, LLM_KV_SPLIT_*): split.no counts from 0, the names from 1.
SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS = "split.count", "split.no", "split.tensors.count"
SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class LongArray:
    """A metadata array too long to keep (a vocabulary): its element type and length."""

    item_type: str
    length: int


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """One entry of the tensor table: name, ggml type, dims (ne order) and byte size."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int  # in its own file
    n_bytes: int
    shard: int = 0  # the file of a split GGUF that holds it (0: the first, or the only one)

    @property
    def n_elements(self) -> int:
        """Number of weights in the tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, kw_only=True)
class GGUFHeader:
    """Parsed header: GGUF version, metadata key/values and the tensor table (of every shard of a split GGUF,
    whose ``file_size`` is then that of all shards, and ``files`` their paths in order)."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    files: tuple[str, ...] = ()


class _Cursor:
    """Little-endian reader over a memory map; raises EOFError past the end."""

    def __init__(self, buf: mmap.mmap | bytes):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise EOFError
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buf):
            raise EOFError
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.unpack("<Q")
        self.pos += length
        if self.pos > len(self.buf):
            raise EOFError

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.unpack("<I"))
            length = self.unpack("<Q")
            if length > MAX_MATERIALISED_ARRAY:
                self._skip_array(item_type, length)
                return LongArray(item_type.name, length)
            return [self.value(item_type) for _ in range(length)]
        return self.unpack(_SCALAR_FORMATS[vtype])

    def _skip_array(self, item_type: GGUFValueType, length: int) -> None:
        if item_type == GGUFValueType.STRING:
            for _ in range(length):
                self.skip_string()
        elif item_type == GGUFValueType.ARRAY:
            for _ in range(length):
                self.value(GGUFValueType.ARRAY)
        else:
            self.pos += struct.calcsize(_SCALAR_FORMATS[item_type]) * length
            if self.pos > len(self.buf):
                raise EOFError


def check_model_path(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path if it names a readable GGUF file, else raise UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model file not found: {p}", "check the path, or run `llama-tuner demo` for the demo model")
    if p.is_dir():
        raise UserError(f"{p} is a directory, not a GGUF file", "pass the path of the .gguf file inside it")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {p}: {exc.strerror}", "check the file's permissions") from None
    if magic != GGUF_MAGIC:
        raise UserError(
            f"{p} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
            "pass a .gguf model (convert others with llama.cpp's convert_hf_to_gguf.py)",
        )
    return p


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        raise UserError(f"unknown ggml tensor type {type_id}", "update llama-tuner's gguf package") from None


def _tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def _read_file(path: str | os.PathLike) -> GGUFHeader:
    """Parse the header of the one GGUF file at ``path`` (a shard of a split GGUF alone).

    Raises:
        UserError: the file is missing, a directory, not GGUF, or truncated.
    """
    p = check_model_path(path)
    size = p.stat().st_size
    damaged = f"{p} is truncated or damaged"
    fix = "download or generate it again"
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        try:
            cur.pos = 4
            version = cur.unpack("<I")
            if version not in (2, 3):
                raise UserError(f"{p} has GGUF version {version}", "llama-tuner reads GGUF v2 and v3 files")
            n_tensors = cur.unpack("<Q")
            n_kv = cur.unpack("<Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.unpack("<I"))
            raw_tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("<I")
                shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
                type_name = _type_name(cur.unpack("<I"))
                raw_tensors.append((name, type_name, shape, cur.unpack("<Q")))
        except (EOFError, ValueError, KeyError, struct.error):
            raise UserError(f"{damaged}: its header ends early or holds invalid values", fix) from None
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors = [TensorInfo(name=n, type_name=t, shape=s, offset=data_offset + o, n_bytes=_tensor_bytes(t, s))
               for n, t, s, o in raw_tensors]
    end = max((t.offset + t.n_bytes for t in tensors), default=data_offset)
    if end > size:
        raise UserError(f"{damaged}: its tensors need {end:,} bytes but the file has {size:,}", fix)
    return GGUFHeader(version=version, metadata=metadata, tensors=tensors, data_offset=data_offset, file_size=size,
                      files=(str(p),))


def _split_count(metadata: dict[str, Any]) -> int:
    return int(metadata.get(SPLIT_COUNT, 0) or 0)


def shard_paths(path: str | os.PathLike, metadata: dict[str, Any]) -> list[Path]:
    """The files of the model whose first file is ``path`` with ``metadata``: that file alone, or every shard
    of a split GGUF in order, named as llama.cpp derives them from the first (llama_split_prefix).

    Raises:
        UserError: ``path`` is a later shard, is not named as gguf-split names shards, or a shard is missing.
    """
    p = Path(path)
    count = _split_count(metadata)
    if count <= 1:
        return [p]
    no = int(metadata.get(SPLIT_NO, 0) or 0)
    suffix = f"-{no + 1:05d}-of-{count:05d}.gguf"
    if not p.name.endswith(suffix) or len(p.name) == len(suffix):
        raise UserError(f"{p} is shard {no + 1} of a split GGUF of {count} files, but its name does not end in "
                        f"{suffix}", "keep the names gguf-split gave the shards: llama.cpp finds them by name")
    prefix = p.name[:-len(suffix)]
    if no != 0:
        raise UserError(f"{p} is shard {no + 1} of {count} of a split GGUF",
                        f"pass the first shard, {p.with_name(f'{prefix}-00001-of-{count:05d}.gguf')}")
    paths = [p.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for q in paths[1:]:
        if not q.exists():
            raise UserError(f"shard {q} is missing ({p.name} is the first of {count} files)",
                            "download every shard of the model into the same folder")
    return paths


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files a model is made of, in order: ``path`` itself, or every shard of a split GGUF whose first
    shard ``path`` is (a file named ``NAME-00001-of-0000N.gguf`` whose header says it is split).

    Raises:
        UserError: as :func:`shard_paths`; or a file named as a shard is not a whole GGUF.
    """
    p = Path(path)
    if not SPLIT_NAME.search(p.name):
        return [p]
    return shard_paths(p, _read_file(p).metadata)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse the header of the GGUF model at ``path``; UserError if it is not a whole GGUF. For the first shard
    of a split GGUF, the header holds the first shard's metadata and the tensors of every shard.

    Raises:
        UserError: a file is missing, a directory, not GGUF, or truncated; a split GGUF is passed by a later
            shard, lacks a shard, or its shards disagree with each other.
    """
    first = _read_file(path)
    paths = shard_paths(path, first.metadata)
    if len(paths) == 1:
        return first
    count, headers = len(paths), [first]
    for i, q in enumerate(paths[1:], start=1):
        h = _read_file(q)
        if (int(h.metadata.get(SPLIT_NO, -1)), _split_count(h.metadata)) != (i, count):
            raise UserError(f"{q} is not shard {i + 1} of {count} of {paths[0].name} (its split.no is "
                            f"{h.metadata.get(SPLIT_NO)}, its split.count {h.metadata.get(SPLIT_COUNT)})",
                            "download or split the model again")
        headers.append(h)
    tensors = [replace(t, shard=i) for i, h in enumerate(headers) for t in h.tensors]
    expected = first.metadata.get(SPLIT_TENSORS)
    if expected is not None and int(expected) != len(tensors):
        raise UserError(f"the {count} shards of {paths[0].name} hold {len(tensors)} tensors, its header says "
                        f"{expected}", "download or split the model again")
    return GGUFHeader(version=first.version, metadata=first.metadata, tensors=tensors,
                      data_offset=first.data_offset, file_size=sum(h.file_size for h in headers),
                      files=tuple(str(q) for q in paths))
