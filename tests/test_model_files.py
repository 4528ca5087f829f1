"""Reading GGUF headers: real and generated models, and every kind of bad file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from conftest import assert_one_line_error
from llama_tuner.errors import UserError
from llama_tuner.model.gguf_header import read_gguf_header
from llama_tuner.model.info import load_model_info, swa_layer_flags
from llama_tuner.model.twins import SHAPES, plan_tensors


def test_header_matches_gguf_packages_reader(tiny_model):
    ours = read_gguf_header(tiny_model)
    theirs = GGUFReader(tiny_model)
    assert [(t.name, t.type_name) for t in ours.tensors] == [(t.name, t.tensor_type.name) for t in theirs.tensors]
    assert [t.offset for t in ours.tensors] == [int(t.data_offset) for t in theirs.tensors]
    assert [t.n_bytes for t in ours.tensors] == [int(t.n_bytes) for t in theirs.tensors]
    assert ours.metadata["llama.block_count"] == 2


def test_demo_model_description(demo_model_path):
    info = load_model_info(demo_model_path)
    assert (info.architecture, info.n_layer, info.n_embd, info.n_vocab) == ("gemma3", 18, 640, 262144)
    assert (max(info.n_head), max(info.n_head_kv), info.head_dim_k) == (4, 1, 256)
    assert info.quant == "Q4_K_M" and info.n_ctx_train == 32768
    # Gemma 3: every 6th layer has full attention, the rest a 512-token window.
    assert info.n_swa == 512 and [i for i in range(18) if i not in info.swa_layers] == [5, 11, 17]
    assert info.tied_embeddings and info.output_bytes >= info.token_embd_bytes
    # K and V of 256 f16 values per layer per token: 18 layers x 2 x 256 x 2 bytes.
    assert info.kv_bytes_per_token("f16", "f16") == 18 * 2 * 256 * 2
    assert info.kv_bytes_per_token("f16", "f16", swa=False) == 3 * 2 * 256 * 2
    # q8_0 stores 32 values in 34 bytes.
    assert info.kv_bytes_per_token("q8_0", "q8_0") == 18 * 2 * 8 * 34
    assert sum(info.layer_bytes) + info.token_embd_bytes < info.file_size


def test_swa_patterns_follow_llama_cpp():
    assert swa_layer_flags("gemma2", 4, 4096, None) == [True, False, True, False]
    assert swa_layer_flags("llama", 4, 4096, None) == [False] * 4  # llama has no default pattern
    assert swa_layer_flags("gemma3", 3, 0, None) == [False] * 3  # no window, no SWA
    assert swa_layer_flags("gemma3", 4, 512, [True, False, True, True]) == [True, False, True, True]
    assert swa_layer_flags("smallthinker", 5, 4096, None) == [False, True, True, True, False]


# Sizes of the real GGUF files, rounded to 10 MB (as the device README reports them).
@pytest.mark.parametrize("like,quant,real_bytes", [
    ("qwen3-8b", "q4_k_m", 5.03e9),           # Qwen3-8B Q4_K_M
    ("mistral-small-24b", "q2_k", 8.89e9),    # Mistral-Small-24B-Instruct-2501 Q2_K
])
def test_twins_have_the_real_models_size(like, quant, real_bytes):
    planned = sum(t.n_bytes for t in plan_tensors(SHAPES[like], quant))
    assert abs(planned - real_bytes) / real_bytes < 0.005


def test_quant_mixes_follow_llama_cpp():
    q4 = {t.name: t.type_name for t in plan_tensors(SHAPES["qwen3-8b"], "q4_k_m")}
    assert q4["output.weight"] == "Q6_K" and q4["token_embd.weight"] == "Q4_K"
    assert q4["blk.0.attn_v.weight"] == "Q6_K" and q4["blk.5.attn_v.weight"] == "Q4_K"
    assert q4["blk.6.ffn_down.weight"] == "Q6_K" and q4["blk.10.attn_q.weight"] == "Q4_K"
    assert sum(v == "Q6_K" for k, v in q4.items() if k.endswith("ffn_down.weight")) == 18
    q2 = {t.name: t.type_name for t in plan_tensors(SHAPES["mistral-small-24b"], "q2_k")}
    assert q2["blk.3.attn_v.weight"] == "Q4_K"  # 4 query heads per KV head
    assert q2["blk.3.ffn_down.weight"] == "Q3_K" and q2["blk.3.attn_output.weight"] == "Q3_K"
    assert q2["blk.3.ffn_up.weight"] == "Q2_K" and q2["output.weight"] == "Q6_K"


def test_generated_weights_are_finite(tiny_model):
    reader = GGUFReader(tiny_model)
    for t in reader.tensors:
        if t.tensor_type in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K):
            values = dequantize(t.data, t.tensor_type)
            assert np.isfinite(values).all() and np.abs(values).max() < 1.0, t.name


@pytest.mark.parametrize("kind,needle", [
    ("missing", "not found"), ("directory", "is a directory"), ("not_gguf", "not a GGUF file"),
    ("empty", "not a GGUF file"), ("truncated_header", "truncated"), ("truncated_data", "truncated"),
])
def test_bad_files_raise_one_clear_error(bad_files, kind, needle):
    with pytest.raises(UserError, match=needle):
        read_gguf_header(bad_files[kind])


@pytest.mark.parametrize("kind,needle", [
    ("missing", "not found"), ("directory", "directory"), ("not_gguf", "not a GGUF"),
    ("truncated_header", "truncated"), ("truncated_data", "truncated"),
])
@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_cli_bad_files_one_line_exit_2(cli, bad_files, kind, needle, command):
    assert_one_line_error(cli(command, bad_files[kind]), needle)


def test_inspect_json_lists_every_tensor(cli, tiny_model):
    r = cli("inspect", tiny_model, "--json")
    assert r.code == 0, r.err
    d = json.loads(r.out)
    assert d["n_layer"] == 2 and d["quant"] == "Q4_K_M"
    assert len(d["tensors"]) == len(read_gguf_header(tiny_model).tensors)
    assert d["kv_bytes_per_token"]["f16"]["all"] == 2 * 2 * (2 * 64) * 2
    text = cli("inspect", tiny_model)
    assert "blk.*.attn_v.weight" in text.out and "KV q8_0" in text.out


def test_synth_cli_writes_a_loadable_custom_shape(cli, tmp_path):
    out = tmp_path / "custom.gguf"
    r = cli("synth", "--layers", 3, "--embd", 256, "--heads", 4, "--kv-heads", 1, "--ffn", 768,
                "--vocab", 512, "--quant", "q8_0", out)
    assert r.code == 0, r.err
    info = load_model_info(out)
    assert (info.n_layer, info.n_embd, info.n_head_kv[0], info.n_ff, info.n_vocab) == (3, 256, 1, 768, 512)
    assert_one_line_error(cli("synth", "--like", "nosuch", "--quant", "q8_0", tmp_path / "x.gguf"), "nosuch")
    assert_one_line_error(cli("synth", "--layers", 2, "--quant", "q8_0", tmp_path / "x.gguf"), "--embd")


def test_synth_names_the_real_flags_of_a_missing_shape_field(cli, tmp_path):
    r = cli("synth", "--arch", "llama", "--embd", 640, "--quant", "q4_0", tmp_path / "out.gguf")
    assert_one_line_error(r, "--layers, --heads, --ffn, --vocab")
    for flag in r.err.split("needs ")[1].split(";")[0].split(", "):  # every flag it names is one synth takes
        assert cli("synth", "--help").out.count(flag + " ") >= 1, flag


def test_model_hash_cache_is_reused_and_drops_files_that_changed(tmp_path):
    import json

    from llama_tuner.measure.environment import model_sha256

    cache = tmp_path / "cache.json"
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"one"), b.write_bytes(b"two")
    first = model_sha256(a, cache)
    model_sha256(b, cache)
    assert first == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"  # sha256("one")
    key = next(k for k in json.loads(cache.read_text()) if k.startswith(str(a)))
    cache.write_text(json.dumps({**json.loads(cache.read_text()), key: "from-cache"}))
    assert model_sha256(a, cache) == "from-cache"  # same path, size and mtime: not hashed again
    b.unlink()
    a.write_bytes(b"changed")
    assert model_sha256(a, cache) != first
    assert [k.split("|")[0] for k in json.loads(cache.read_text())] == [str(a)]
