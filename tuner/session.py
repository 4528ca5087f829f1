"""Assemble a Tuner from what the user asked for: model, machine, space, limits, baselines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import optuna

from tuner.baseline import parse_server_flags, server_defaults
from tuner.config import TEST_KEYS, BenchConfig, InvalidConfig
from tuner.errors import UserError
from tuner.fingerprint import build_environment, model_sha256
from tuner.launcher import Launcher, SubprocessLauncher
from tuner.model_info import ModelInfo, load_model_info
from tuner.optuna_setup import make_storage
from tuner.probe import GpuProbe, detect_probe, visible_gpu_index
from tuner.records import Limits
from tuner.result import Environment
from tuner.space import STUDY_TEST, Machine, SearchSpace, SpaceOptions
from tuner.study import Fingerprint, StudySettings, Tuner
from tuner.tracking import Tracker

REQUEST_ATTR = "request"
from tuner.units import parse_duration, parse_size


@dataclass
class StudyRequest:
    """The options of ``tune`` (strings still unparsed where the user typed them)."""

    model: str
    trials: int = 20
    study_name: str | None = None
    timeout: str | None = None
    vram_budget: str | None = None
    min_headroom: str = "512MiB"
    min_ctx: int = 4096
    depth: int = 0
    objective: str = "tg"
    baseline_flags: str | None = None
    pins: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    sampler: str = "tpe"
    seed: int | None = None
    storage: str = "sqlite:///studies/llama-tuner.db"
    trial_timeout: str = "15m"


def _pins(raw: dict[str, str]) -> dict[str, object]:
    """Typed pins; unknown keys and bad values raise InvalidConfig naming them."""
    typed = BenchConfig.from_dict(raw).to_dict()
    return {k: typed[k] for k in raw}


def _budget(request: StudyRequest, env: Environment) -> int:
    device = env.vram_total_bytes if env.gpu_name else env.ram_total_bytes
    what = f"the GPU's {device / 2**30:.1f} GiB" if env.gpu_name else f"this machine's {device / 2**30:.1f} GiB of RAM"
    if request.vram_budget is None:
        return device
    budget = parse_size(request.vram_budget, "--vram-budget")
    if budget <= 0 or budget > device:
        raise UserError(f"--vram-budget {request.vram_budget} is outside 0..{what}", "give a budget the device has")
    return budget


def baselines_for(request: StudyRequest, model: ModelInfo, env: Environment,
                  pins: dict[str, object]) -> dict[str, BenchConfig]:
    """llama.cpp's defaults, and the user's --baseline, with the study's test sizes (pins included)."""
    test = {**STUDY_TEST, "n_depth": request.depth}
    test.update({k: v for k, v in pins.items() if k in TEST_KEYS})
    out = {"llama.cpp defaults": server_defaults(model, env.physical_cores, env.gpu_offload)}
    if request.baseline_flags:
        out["yours"] = parse_server_flags(request.baseline_flags, model)
    resolved = {}
    for name, cfg in out.items():
        try:
            resolved[name] = replace(cfg, **test).resolved(model, cores=env.physical_cores)
        except InvalidConfig as exc:
            raise UserError(f"baseline {name!r} is not measurable: {exc.problem}", exc.fix) from None
    return resolved


def open_tuner(request: StudyRequest, launcher: Launcher | None = None, probe: GpuProbe | None = None,
               env: Environment | None = None, tracker: Tracker | None = None, gpu_index: int | None = None,
               storage: optuna.storages.BaseStorage | None = None) -> Tuner:
    """Everything ``tune`` (or ``worker``) needs, validated before anything is measured."""
    from tuner.cli_study import default_study_name

    model = load_model_info(request.model)
    pins = _pins(request.pins)
    timeout_s = parse_duration(request.timeout, "--timeout") if request.timeout else None
    trial_timeout_s = parse_duration(request.trial_timeout, "--trial-timeout")
    min_headroom = parse_size(request.min_headroom, "--min-headroom")
    probe = probe or detect_probe()
    if gpu_index is None and probe.gpus():
        gpu_index = visible_gpu_index()
    env = env or build_environment(probe, gpu_index)
    budget = _budget(request, env)
    baselines = baselines_for(request, model, env, pins)
    options = SpaceOptions(min_ctx=request.min_ctx, depth=request.depth, pins=pins, ranges=request.ranges)
    launcher = launcher or SubprocessLauncher(probe, timeout_s=trial_timeout_s, gpu_index=gpu_index)
    machine = Machine(env.physical_cores, env.gpu_offload and gpu_index is not None,
                      repack_works=launcher.repack_crash() is None)
    space = SearchSpace(model, machine, options, tuple(baselines.values()))
    test = {k: space.fixed[k] for k in ("n_prompt", "n_gen", "n_depth", "repetitions") if k in space.fixed}
    fingerprint = Fingerprint(model_sha256(model.path), env.hardware_key(),
                              f"llama-cpp-python {env.llama_cpp_python}, {env.llama_cpp_build}", test)
    settings = StudySettings(trials=request.trials, objective=request.objective, sampler=request.sampler,
                             seed=request.seed, timeout_s=timeout_s, trial_timeout_s=trial_timeout_s)
    name = request.study_name or default_study_name(model.file_name, env.gpu_name, request.depth)
    tuner = Tuner(storage or make_storage(request.storage), name, model, space, launcher, env, fingerprint,
                  Limits(budget, min_headroom, request.min_ctx), settings, baselines, tracker=tracker,
                  gpu_index=gpu_index)
    if REQUEST_ATTR not in tuner.study.user_attrs:  # how workers rebuild the very same study
        saved = {k: v for k, v in asdict(request).items() if k not in ("storage", "study_name")}
        tuner.study.set_user_attr(REQUEST_ATTR, saved)
    return tuner
