"""--baseline as llama-server runs it: every layer on the GPU unless -ngl says otherwise, fitted by --fit
(on by default) in what the user left unset, and -fit, -fitt, -fitc honoured (llama.cpp common/arg.cpp, fit.cpp)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import assert_one_line_error
from llama_tuner.errors import UserError
from llama_tuner.model.facts import ModelFacts
from llama_tuner.model.twins import SHAPES, describe_shape
from llama_tuner.study.baselines import parse_server_flags, server_baseline, server_defaults
from llama_tuner.study.memory_model import FIT_MARGIN, FIT_MIN_CTX, MemoryModel

GIB, MIB = 2**30, 2**20
LIMIT = 12 * GIB - FIT_MARGIN  # a 12 GiB GPU, less llama-server's default --fit-target


@pytest.fixture(scope="module")
def dense():
    """Mistral Small 24B Q2_K: 13.9 GiB at its 32768-token training context with every layer."""
    return describe_shape(SHAPES["mistral-small-24b"], "q2_k")


@pytest.fixture(scope="module")
def memory(dense):
    return MemoryModel(ModelFacts.of(dense), on_gpu=True)


def on_gpu(flags, model, limit=LIMIT):
    return server_baseline(flags, model, gpu_offload=True, gpu_limit=limit)


def test_without_ngl_every_layer_is_offloaded(dense):
    assert parse_server_flags("llama-server -m x.gguf -c 4096", dense).n_gpu_layers == dense.n_gpu_layers_all
    assert server_baseline("-c 4096", dense, gpu_offload=False, gpu_limit=None).n_gpu_layers == 0  # a CPU build


def test_without_ngl_the_baseline_is_fitted_as_llama_servers_defaults_are(dense, memory):
    yours = on_gpu("llama-server -m x.gguf -t 8", dense)
    defaults = memory.fit_like_llama_server(server_defaults(dense, 8, gpu_offload=True), LIMIT)
    assert yours == replace(defaults, n_threads=8, n_threads_batch=8)  # the "llama-server defaults (fit)" logic
    assert yours.n_gpu_layers == dense.n_gpu_layers_all and yours.n_ctx < dense.n_ctx_train
    assert memory.predict(yours) <= LIMIT
    for auto in ("-ngl auto", "-ngl -1", "--gpu-layers=auto"):  # llama-server's default, spelled out
        assert on_gpu(f"-t 8 {auto}", dense) == yours
    assert server_baseline("", dense, gpu_offload=True, gpu_limit=LIMIT) == replace(yours, n_threads=None,
                                                                                    n_threads_batch=None)


def test_fit_changes_only_what_the_user_left_unset(dense, memory):
    ctx = on_gpu("-c 32768", dense)  # the context was given: layers leave the GPU instead
    assert ctx.n_ctx == 32768 and ctx.n_gpu_layers < dense.n_gpu_layers_all and memory.predict(ctx) <= LIMIT
    layers = on_gpu("-ngl 20", dense, limit=6 * GIB)  # the layers were given: only the context shrinks
    assert layers.n_gpu_layers == 20 and layers.n_ctx < dense.n_ctx_train
    full = on_gpu("-ngl all", dense, limit=6 * GIB)  # all is not auto: kept, though it does not fit
    assert full.n_gpu_layers == dense.n_gpu_layers_all and full.n_ctx == FIT_MIN_CTX
    assert memory.predict(full) > 6 * GIB
    train = on_gpu("-c 0", dense)  # -c 0 asks for the training context: --fit keeps it
    assert train.n_ctx == dense.n_ctx_train and train.n_gpu_layers < dense.n_gpu_layers_all
    assert on_gpu("-c 0 -fitc 4096", dense) == on_gpu("", dense)  # a later --fit-ctx lets it shrink again


def test_fit_off_target_and_ctx_are_honoured(dense, memory):
    off = on_gpu("-fit off", dense)  # no fitting: every layer, the training context
    assert (off.n_gpu_layers, off.n_ctx) == (dense.n_gpu_layers_all, dense.n_ctx_train)
    assert memory.predict(off) > LIMIT and on_gpu("--fit=on", dense) == on_gpu("", dense)
    roomy, tight = on_gpu("", dense), on_gpu("-fitt 3072", dense)  # 3 GiB left free instead of 1 GiB
    assert tight.n_ctx < roomy.n_ctx and memory.predict(tight) <= LIMIT + FIT_MARGIN - 3072 * MIB
    assert on_gpu("--fit-target 1024", dense) == roomy  # llama-server's default margin, spelled out
    squeezed = on_gpu("", dense, limit=8 * GIB)  # even the least context leaves layers off the GPU
    floor = on_gpu("-fitc 8192", dense, limit=8 * GIB)
    assert squeezed.n_ctx < 8192 <= floor.n_ctx and floor.n_gpu_layers < squeezed.n_gpu_layers


def test_experts_given_are_kept(dense):
    moe = describe_shape(SHAPES["qwen3-30b-a3b"], "q4_k_m")
    fitted = on_gpu("", moe)
    assert fitted.n_cpu_moe > 0  # --fit moves experts to host memory
    given = on_gpu("-ncmoe 2", moe)  # a tensor override given: --fit leaves layers and experts alone
    assert (given.n_cpu_moe, given.n_gpu_layers) == (2, moe.n_gpu_layers_all) and given.n_ctx == FIT_MIN_CTX


@pytest.mark.parametrize("flags,needle", [
    ("-fit maybe", "unknown -fit value 'maybe'"),
    ("--fit", "--fit needs a value"),
    ("-fitt 1024,2048", "one margin per GPU"),
    ("-fitt lots", "-fitt 'lots' is not a size in MiB"),
    ("-fitc 0", "-fitc 0 is no context"),
    ("-fitp on", "unsupported llama-server flag -fitp"),  # llama-fit-params' flag, not llama-server's
    ("-ngl many", "-ngl 'many' is not a number"),
])
def test_fit_flags_llama_tuner_cannot_model_are_refused_by_name(dense, flags, needle):
    with pytest.raises(UserError, match=needle):
        parse_server_flags(flags, dense)


@pytest.mark.parametrize("flags,needle", [
    ("-c 2048 -fitt 1024,2048", "-fitt 1024,2048 gives one margin per GPU"),
    ("-c 2048 --fit sometimes", "unknown --fit value 'sometimes'"),
    ("-c 2048 --fit-print on", "unsupported llama-server flag --fit-print"),
])
def test_bad_fit_flags_are_one_line_before_any_work(cli, tiny_model, tmp_path, no_work_before_checks, flags, needle):
    r = cli("tune", tiny_model, "--storage", f"sqlite:///{tmp_path}/s.db", "--no-mlflow", "--baseline", flags)
    assert_one_line_error(r, needle)
