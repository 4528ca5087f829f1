"""Joining a study as a worker: same space, same limits, same hardware, its own GPU.

A study created by ``tune`` records how it was requested; a worker rebuilds the
identical Tuner from that record, refuses to measure on different hardware or a
different model file (the fingerprint check), points its children at one GPU
with ``CUDA_VISIBLE_DEVICES`` (see :func:`gpu_choice`), and runs trials until the study has its count.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import optuna

from llama_tuner.errors import UserError
from llama_tuner.measure.environment import build_environment
from llama_tuner.measure.launcher import Launcher, SubprocessLauncher
from llama_tuner.measure.probe import GpuProbe, detect_probe
from llama_tuner.measure.result import Environment
from llama_tuner.study.keys import FINGERPRINT_ATTR, REQUEST_ATTR, SCENARIOS_ATTR, TG_PROMPT_ATTR
from llama_tuner.study.session import StudyRequest, engine_of, open_tuner, server_launcher
from llama_tuner.study.storage import GRACE_S, HEARTBEAT_S, make_storage
from llama_tuner.study.tracker import Tracker
from llama_tuner.study.tuner import Tuner
from llama_tuner.units import parse_duration


def gpu_choice(gpu: str | int | None, probe: GpuProbe) -> tuple[int | None, dict[str, str]]:
    """The NVML index of the GPU ``--gpu`` names, and what the worker's children add to their environment.

    ``gpu`` is an index as NVML (and nvidia-smi) number GPUs, by PCI bus, or a UUID (``GPU-...``). The
    children get ``CUDA_VISIBLE_DEVICES`` set to it as given and ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so that
    CUDA, which by default puts the fastest GPU first, numbers the GPUs as NVML does, and the GPU the
    children measure on is the one whose memory NVML reads. None: no GPU named (index None), nothing added.

    Raises:
        UserError: no GPU of that index or UUID on this machine.
    """
    if gpu is None:
        return None, {}
    name = str(gpu).strip()
    found = probe.find(name)
    if found is None:
        seen = ", ".join(f"{g.index} ({g.uuid})" if g.uuid else str(g.index) for g in probe.gpus()) or "none"
        raise UserError(f"--gpu {name}: no such GPU on this machine (NVML sees {seen})",
                        "give an index or a UUID as nvidia-smi -L lists them, or leave out --gpu")
    return found.index, {"CUDA_VISIBLE_DEVICES": name, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def join_study(study_name: str, storage_url: str, *, gpu: str | int | None = None, model: str | None = None,
               tracker: Tracker | None = None, launcher: Launcher | None = None, probe: GpuProbe | None = None,
               env: Environment | None = None, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S) -> Tuner:
    """A Tuner for an existing study, checked against this machine; ``gpu`` as :func:`gpu_choice` takes it.

    Raises:
        UserError: no such study, one not made by ``tune``, its model file missing here, no GPU ``gpu``
            here, or hardware other than the study's.
    """
    storage = make_storage(storage_url, heartbeat_s, grace_s)
    try:
        attrs = optuna.load_study(study_name=study_name, storage=storage).user_attrs
    except KeyError:
        raise UserError(f"no study named {study_name!r} at {storage_url}",
                        f"create it first: llama-tuner tune MODEL --study {study_name} "
                        f"--storage {storage_url}") from None
    if REQUEST_ATTR not in attrs:
        raise UserError(f"study {study_name!r} was not created by llama-tuner tune", "create it with tune")
    saved = dict(attrs[REQUEST_ATTR])
    request = StudyRequest(**{**saved, "storage": storage_url, "study_name": study_name,
                              "model": model or saved["model"], "tg_prompt_text": attrs.get(TG_PROMPT_ATTR),
                              "scenario_lines": attrs.get(SCENARIOS_ATTR)})
    if engine_of(request) == "llama-server" and request.llama_server and not shutil.which(request.llama_server):
        request = replace(request, llama_server=None)  # the study's host's path: find this machine's own
    if not Path(request.model).exists():
        raise UserError(f"the study's model {request.model} is not on this machine",
                        "copy it there, or pass --model PATH to the same file")
    probe = probe or detect_probe()
    index, extra_env = gpu_choice(gpu, probe)
    if launcher is None and engine_of(request) == "llama-server":
        launcher = server_launcher(request, probe, timeout_s=parse_duration(request.trial_timeout), gpu_index=index,
                                   extra_env=extra_env)
        env = env or launcher.environment()
    if env is None:
        env = build_environment(probe, index if index is not None else (0 if probe.gpus() else None))
    want = attrs.get(FINGERPRINT_ATTR, {}).get("hardware")
    if want and env.hardware_key() != want:
        raise UserError(f"this machine ({env.hardware_key()}) differs from the study's hardware ({want}), so its "
                        f"figures would not compare",
                        f"start its own study: llama-tuner tune {request.model} --study {study_name}-"
                        f"{env.host} --storage {storage_url}")
    if launcher is None:
        launcher = SubprocessLauncher(probe, timeout_s=parse_duration(request.trial_timeout), gpu_index=index,
                                      extra_env=extra_env)
    return open_tuner(request, launcher=launcher, probe=probe, env=env, tracker=tracker, gpu_index=index,
                      storage=storage, record_request=False)
