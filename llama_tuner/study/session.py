"""Assemble a Tuner from what the user asked for: model, machine, space, limits, baselines.

Every option is parsed and checked (:func:`check_request`) before anything costly
runs: no llama.cpp child, no bandwidth probe and no study is started for input that
would be refused anyway.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field, replace

import optuna

from llama_tuner.errors import UserError
from llama_tuner.measure.config import (DRAFT_FREE_SPEC_TYPES, ENGINES, SERVER_KEYS, TEST_KEYS, BenchConfig,
                                       InvalidConfig, physical_cores)
from llama_tuner.measure.llama_server import BUILD_HINT, find_llama_server, probe as probe_llama_server
from llama_tuner.measure.server_engine import TG_PROMPT_FILE, ServerLauncher
from llama_tuner.measure.environment import build_environment, model_sha256
from llama_tuner.measure.launcher import Launcher, SubprocessLauncher
from llama_tuner.measure.probe import GpuProbe, detect_probe, visible_gpu_index
from llama_tuner.measure.result import Environment
from llama_tuner.model.info import ModelInfo, load_model_info
from llama_tuner.study.baselines import SERVER_AUTO_SLOTS, parse_server_flags, server_baseline, server_defaults
from llama_tuner.model.facts import ModelFacts
from llama_tuner.study.keys import DEFAULTS_BASELINE, REQUEST_ATTR, SCENARIOS_ATTR, TG_PROMPT_ATTR
from llama_tuner.study.memory_model import FIT_MARGIN, MemoryModel
from llama_tuner.study.objectives import Limits
from llama_tuner.measure.scenarios import (Scenario, capped_to, load_scenarios, refuse_twin, scenarios_of,
                                           scenarios_sha256, test_sizes)
from llama_tuner.measure.workloads import SCENARIOS, WORKLOADS, judged_by_answer
from llama_tuner.study.space import Machine, SearchSpace, SpaceOptions, check_ranges, study_test
from llama_tuner.study.presets import OBJECTIVES
from llama_tuner.study.quality_gate import DEFAULT_MAX_KLD
from llama_tuner.study.storage import DEFAULT_STORAGE, SAMPLERS, make_storage
from llama_tuner.study.tracker import Tracker
from llama_tuner.study.settings import Fingerprint, StudySettings
from llama_tuner.study.tuner import Tuner
from llama_tuner.units import parse_duration, parse_size


@dataclass(kw_only=True)
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
    objective: str | None = None  # None: the workload's own (answer for curves, else tg)
    baseline_flags: str | None = None
    pins: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    sampler: str = "tpe"
    seed: int | None = None
    storage: str = DEFAULT_STORAGE
    trial_timeout: str = "15m"
    max_kld: float = DEFAULT_MAX_KLD
    workload: str = "pp-tg"
    prompt_tokens: int | None = None
    gen_tokens: int | None = None
    min_stream_tps: float = 0.0
    engine: str | None = None  # "child", or "llama-server": every trial measured in llama-server (speculative
    # decoding); None: the child, llama-server for the scenarios
    llama_server: str | None = None  # --llama-server PATH (else found: llama_tuner.measure.llama_server)
    tg_prompt: str | None = None  # llama-server engine: tg answers this request (a file); None: the bundled one
    draft_model: str | None = None  # llama-server engine: a draft model, searched as --spec-type draft-simple
    tg_prompt_text: str | None = None  # the request itself (a worker has the study's, not its file)
    prompts: str | None = None  # scenarios: the requests' JSONL file (None: the bundled one)
    max_tokens: int | None = None  # scenarios: every answer capped at this many tokens (None: the file's caps)
    max_capped: float = 1.0  # scenarios: the share of capped answers a preset may have (1: any)
    scenario_lines: list[dict] | None = None  # the requests themselves (a worker has the study's, not its file)


@dataclass(frozen=True, kw_only=True)
class CheckedRequest:
    """A request with every option parsed and checked against the model (nothing measured yet)."""

    model: ModelInfo
    pins: dict[str, object]
    timeout_s: float | None
    trial_timeout_s: float
    min_headroom: int
    budget: int | None  # None: the whole device
    yours: BenchConfig | None  # the --baseline command line, as parsed
    test: dict[str, object]  # what every trial measures (the workload's sizes)
    min_ctx: int  # --min-ctx, raised to what the workload's test needs
    tg_prompt: str = ""  # the llama-server engine's request in words ("" with the child)
    scenarios: tuple[Scenario, ...] = ()  # the scenarios workload's requests
    engine: str = "child"  # the engine that measures (resolved: llama-server for the scenarios)


def default_study_name(model_file: str, gpu_name: str | None, depth: int, workload: str = "pp-tg",
                       engine: str = "child") -> str:
    """``<model stem>@<cpu|gpu-name>[-<workload>][-d<depth>][-server]``: the same command finds the same study
    again (``-server``: measured by llama-server)."""
    stem = re.sub(r"\.gguf$", "", model_file)
    where = "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() if gpu_name else "cpu"
    return (f"{stem}@{where}" + (f"-{workload}" if workload != "pp-tg" else "") + (f"-d{depth}" if depth else "")
            + ("-server" if engine == "llama-server" else ""))


def _pins(raw: dict[str, str]) -> dict[str, object]:
    """Typed pins; unknown keys and bad values raise InvalidConfig naming them."""
    typed = BenchConfig.from_dict(raw).to_dict()
    pins = {k: typed[k] for k in raw}
    for key, what in (("n_prompt", "prompt"), ("n_gen", "generation")):
        if key in pins and pins[key] < 1:  # every preset is ranked and reported by its pp and tg
            raise UserError(f"--set {key}={pins[key]} leaves the study without a {what} test, and its presets "
                            "need both pp and tg figures", f"pin {key} to 1 or more, or measure it with "
                            f"`llama-tuner bench MODEL --{key.replace('_', '-')} 0`")
    return pins


def objective_of(request: StudyRequest) -> str:
    """What 'fastest' means: --objective, else the workload's own (seconds to answer for chat, reasoning, long and
    custom; aggregate generation for server; generation for pp-tg)."""
    return request.objective or ("answer" if judged_by_answer(request.workload) else "tg")


def check_request(request: StudyRequest) -> CheckedRequest:
    """Parse and check every option, cheaply, before any measurement or study starts.

    Raises:
        UserError: a bad model file, option value, pin, range or baseline, naming the fix.
    """
    if request.trials < 1:
        raise UserError(f"--trials {request.trials} measures nothing", "use --trials 1 or more")
    if request.objective is not None and request.objective not in OBJECTIVES:
        raise UserError(f"--objective {request.objective!r} is unknown", f"use one of {', '.join(OBJECTIVES)}")
    if request.workload not in WORKLOADS:
        raise UserError(f"--workload {request.workload!r} is unknown", f"use one of {', '.join(WORKLOADS)}")
    if request.objective is not None and (request.objective == "answer") != judged_by_answer(request.workload):
        raise UserError(f"--objective {request.objective} does not judge the {request.workload} workload",
                        "leave --objective out: each workload has its own")
    for flag, value in (("--prompt-tokens", request.prompt_tokens), ("--gen-tokens", request.gen_tokens)):
        if value is not None and (value < 1 or request.workload == "pp-tg"):
            raise UserError(f"{flag} {value} needs a workload with a prompt and an answer",
                            f"use {flag} 1 or more with --workload custom (or chat, reasoning, long)")
    if request.min_stream_tps < 0 or (request.min_stream_tps and request.workload != "server"):
        raise UserError(f"--min-stream-tps {request.min_stream_tps} applies to --workload server only",
                        "add --workload server, or leave --min-stream-tps out")
    if not request.max_kld >= 0:
        raise UserError(f"--max-kld {request.max_kld} is below 0", "give a KL divergence like 0.02")
    if request.sampler not in SAMPLERS:
        raise UserError(f"--sampler {request.sampler!r} is unknown", f"use one of {', '.join(SAMPLERS)}")
    if not 0 <= request.max_capped <= 1 or (request.max_capped < 1 and request.workload != SCENARIOS):
        raise UserError(f"--max-capped {request.max_capped} is a share of the scenarios' answers (0 to 1)",
                        "give a share like 0.1 with --workload scenarios, or leave --max-capped out")
    tg_prompt = _check_engine(request)
    model = load_model_info(_absolute(request.model))
    scenarios = _check_scenarios(request, model)
    pins = _pins(request.pins)
    prompt_tokens, gen_tokens = test_sizes(scenarios) if scenarios else (request.prompt_tokens, request.gen_tokens)
    test = study_test(request.workload, depth=request.depth, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens)
    if scenarios:  # one pass over the file a trial; the race's rounds are the repetitions that decide
        test["repetitions"] = 1
    min_ctx = request.min_ctx
    if request.workload != "pp-tg":  # the test's own context, rounded up to a multiple of 1024
        need = BenchConfig(**{**test, **{k: v for k, v in pins.items() if k in TEST_KEYS}}).context_needed()
        # Never above the training context: a test that cannot fit it is refused by the space, by name.
        min_ctx = max(min_ctx, min(-(-need // 1024) * 1024, model.n_ctx_train or need))
    timeout_s = parse_duration(request.timeout, "--timeout") if request.timeout else None
    trial_timeout_s = parse_duration(request.trial_timeout, "--trial-timeout")
    if trial_timeout_s <= 0:
        raise UserError(f"--trial-timeout {request.trial_timeout} kills every measurement before it starts",
                        "give a time above 0, e.g. 15m")
    min_headroom = parse_size(request.min_headroom, "--min-headroom")
    budget = parse_size(request.vram_budget, "--vram-budget") if request.vram_budget is not None else None
    if budget is not None and budget <= 0:
        raise UserError(f"--vram-budget {request.vram_budget} is no memory", "give a budget above 0, e.g. 12GiB")
    yours = None
    if request.baseline_flags:
        yours = parse_server_flags(request.baseline_flags, model, request.workload)
        _measurable("yours", yours, study_test(request.workload, depth=request.depth,
                                               prompt_tokens=request.prompt_tokens, gen_tokens=request.gen_tokens),
                    model, pins, physical_cores())
    # The space checks pins, ranges and --min-ctx; here on a provisional machine (the real one needs a child).
    if "n_gpu_layers" in request.ranges:  # the provisional machine below offloads nothing: check it here
        check_ranges({"n_gpu_layers": request.ranges["n_gpu_layers"]}, model)
    machine = Machine(physical_cores(), gpu_offload=False)
    SearchSpace(model, machine, SpaceOptions(min_ctx=min_ctx, depth=request.depth, pins=pins, test=test,
                                             ranges={k: v for k, v in request.ranges.items()
                                                     if k != "n_gpu_layers"}))
    return CheckedRequest(model=model, pins=pins, timeout_s=timeout_s, trial_timeout_s=trial_timeout_s,
                          min_headroom=min_headroom, budget=budget, yours=yours, test=test, min_ctx=min_ctx,
                          tg_prompt=tg_prompt, scenarios=scenarios, engine=engine_of(request))


def engine_of(request: StudyRequest) -> str:
    """The engine that measures: --engine, else llama-server for the scenarios and the child for the rest."""
    return request.engine or ("llama-server" if request.workload == SCENARIOS else "child")


def _check_scenarios(request: StudyRequest, model: ModelInfo) -> tuple[Scenario, ...]:
    """The scenarios workload's requests (--prompts, else the bundled file; a worker's from the study), capped
    at --max-tokens; () for other workloads.

    Raises:
        UserError: --prompts or --max-tokens without the scenarios, a twin, a bad line (named by its number).
    """
    if request.workload != SCENARIOS:
        if request.prompts or request.max_tokens is not None:
            flag = "--prompts" if request.prompts else "--max-tokens"
            raise UserError(f"{flag} is for the scenarios workload", "add --workload scenarios")
        return ()
    refuse_twin(model)
    scenarios = scenarios_of(request.scenario_lines) if request.scenario_lines else load_scenarios(request.prompts)
    return capped_to(scenarios, request.max_tokens)


def _check_engine(request: StudyRequest) -> str:
    """Check the engine's options; the llama-server engine's tg request in words ("" for the child).

    Raises:
        UserError: an unknown engine, a llama-server option without it, a missing file, a pin it cannot measure.
    """
    engine = engine_of(request)
    if engine not in ENGINES:
        raise UserError(f"--engine {request.engine!r} is unknown", f"use one of {', '.join(ENGINES)}")
    server_only = [flag for flag, v in (("--llama-server", request.llama_server), ("--tg-prompt", request.tg_prompt),
                                        ("--draft-model", request.draft_model)) if v]
    spec_pins = [k for k in SERVER_KEYS if k in request.pins]
    if engine == "child":
        if request.workload == SCENARIOS:
            raise UserError("the scenarios are answered by llama-server; the child engine cannot answer them",
                            "leave --engine out (or use --engine llama-server)")
        if server_only or spec_pins:
            what = server_only[0] if server_only else f"--set {spec_pins[0]}"
            raise UserError(f"{what} is for the llama-server engine", "add --engine llama-server")
        return ""
    if request.workload not in ("pp-tg", SCENARIOS):
        raise UserError(f"--engine llama-server measures the pp-tg and scenarios workloads for now, not "
                        f"{request.workload}", "leave --workload out, or use the child engine")
    if request.workload == SCENARIOS:
        if request.tg_prompt:
            raise UserError("--tg-prompt is for the pp-tg test, not the scenarios", "drop --tg-prompt")
        return ""
    if request.draft_model and not os.path.isfile(request.draft_model):
        raise UserError(f"--draft-model {request.draft_model} is not a file", "give the draft model's GGUF path")
    if request.tg_prompt_text:
        return request.tg_prompt_text
    path = request.tg_prompt or TG_PROMPT_FILE
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError as exc:
        raise UserError(f"--tg-prompt {path} cannot be read ({exc.strerror})", "give a text file") from None
    if not text:
        raise UserError(f"--tg-prompt {path} is empty", "give a file with the request in words")
    return text


def _absolute(path: str) -> str:
    """The model's absolute path, so that exported commands and ``serve`` work from any directory."""
    return os.path.abspath(os.path.expanduser(path))


def _measurable(name: str, cfg: BenchConfig, test: dict[str, object], model: ModelInfo, pins: dict[str, object],
                cores: int) -> BenchConfig:
    """A baseline with the study's test sizes (pins included), checked as llama.cpp would check it."""
    test = {**test, **{k: v for k, v in pins.items() if k in TEST_KEYS}}
    try:
        return replace(cfg, **test).resolved(model, cores=cores)
    except InvalidConfig as exc:
        raise UserError(f"baseline {name!r} is not measurable: {exc.problem}", exc.fix) from None


def _budget(checked: CheckedRequest, request: StudyRequest, env: Environment) -> int:
    device = env.vram_total_bytes if env.uses_gpu else env.ram_total_bytes
    what = f"the GPU's {device / 2**30:.1f} GiB" if env.uses_gpu else f"this machine's {device / 2**30:.1f} GiB of RAM"
    if checked.budget is None:
        return device
    if checked.budget > device:
        raise UserError(f"--vram-budget {request.vram_budget} is outside 0..{what}", "give a budget the device has")
    return checked.budget


def baselines_for(request: StudyRequest, checked: CheckedRequest, env: Environment, *,
                  gpu_limit: int | None = None) -> dict[str, BenchConfig]:
    """llama-server's defaults, fitted as its --fit fits them to ``gpu_limit`` bytes (a GPU's free memory or
    the budget, less the fit's margin), and your --baseline, with the study's test sizes (pins included)."""
    defaults = server_defaults(checked.model, env.physical_cores, env.gpu_offload)
    if request.workload == "server":  # llama-server's slots when -np is not given
        defaults = replace(defaults, workload="server", n_parallel=SERVER_AUTO_SLOTS)
    if gpu_limit is not None:
        memory = MemoryModel(ModelFacts.of(checked.model), on_gpu=True)
        defaults = memory.fit_like_llama_server(defaults, gpu_limit)
    out = {DEFAULTS_BASELINE: _measurable(DEFAULTS_BASELINE, defaults, checked.test, checked.model, checked.pins,
                                          env.physical_cores)}
    if checked.yours is not None:  # what llama-server runs for that command line here, --fit included
        yours = server_baseline(request.baseline_flags, checked.model, workload=request.workload,
                                gpu_offload=env.gpu_offload, gpu_limit=gpu_limit)
        out["yours"] = _measurable("yours", yours, checked.test, checked.model, checked.pins, env.physical_cores)
    return out


def server_launcher(request: StudyRequest, probe: GpuProbe, *, timeout_s: float, gpu_index: int | None,
                    tg_prompt: str | None = None, extra_env: dict[str, str] | None = None,
                    scenarios: tuple[Scenario, ...] | None = None) -> ServerLauncher:
    """The llama-server engine's launcher for ``request`` (its --llama-server, else the one found here).

    Raises:
        UserError: no llama-server here, or it does not run.
    """
    path = find_llama_server(request.llama_server)
    if path is None:
        raise UserError("--engine llama-server: no llama-server here", f"give --llama-server PATH, or {BUILD_HINT}")
    return ServerLauncher(probe_llama_server(path), probe, timeout_s=timeout_s, gpu_index=gpu_index,
                          tg_prompt=_check_engine(request) if tg_prompt is None else tg_prompt, env=extra_env,
                          scenarios=_check_scenarios(request, load_model_info(_absolute(request.model)))
                          if scenarios is None else scenarios)


def open_tuner(request: StudyRequest, *, launcher: Launcher | None = None, probe: GpuProbe | None = None,
               env: Environment | None = None, tracker: Tracker | None = None, gpu_index: int | None = None,
               storage: optuna.storages.BaseStorage | None = None, record_request: bool = True) -> Tuner:
    """Everything ``tune`` (or ``worker``) needs, validated before anything is measured.

    ``record_request`` stores the request on the study (``tune`` does; a worker, which rebuilt it from
    there, does not), so workers build the same study and see a later ``--trials``.

    Raises:
        UserError: bad input (see :func:`check_request`), a budget the device lacks, or a stored study
            of another model, hardware or build.
    """
    checked = check_request(request)
    probe = probe or detect_probe()
    if gpu_index is None and probe.gpus():
        gpu_index = visible_gpu_index(probe)
    spec_types: tuple[str, ...] = ()
    if checked.engine == "llama-server":
        if launcher is None:
            launcher = server_launcher(request, probe, timeout_s=checked.trial_timeout_s, gpu_index=gpu_index,
                                       tg_prompt=checked.tg_prompt, scenarios=checked.scenarios)
        if isinstance(launcher, ServerLauncher):
            env = env or launcher.environment()
            listed = launcher.server.spec_types()
            spec_types = tuple(t for t in DRAFT_FREE_SPEC_TYPES if t in listed)
            if request.draft_model and "draft-simple" in listed:
                spec_types += ("draft-simple",)
    env = env or build_environment(probe, gpu_index)
    budget = _budget(checked, request, env)
    launcher = launcher or SubprocessLauncher(probe, timeout_s=checked.trial_timeout_s, gpu_index=gpu_index)
    on_gpu = env.gpu_offload and gpu_index is not None
    free = launcher.gpu_free_bytes() if on_gpu else None
    gpu_limit = min(budget, free if free is not None else budget) - FIT_MARGIN if on_gpu else None
    baselines = baselines_for(request, checked, env, gpu_limit=gpu_limit)
    options = SpaceOptions(min_ctx=checked.min_ctx, depth=request.depth, pins=checked.pins, ranges=request.ranges,
                           test=checked.test, spec_types=spec_types,
                           draft_model=os.path.abspath(request.draft_model) if request.draft_model else "")
    machine = Machine(env.physical_cores, env.gpu_offload and gpu_index is not None,
                      repack_works=launcher.repack_crash() is None)
    space = SearchSpace(checked.model, machine, options, tuple(baselines.values()))
    test = {k: space.fixed[k] for k in ("n_prompt", "n_gen", "n_depth", "repetitions") if k in space.fixed}
    if request.workload != "pp-tg":  # older studies have no workload in their fingerprint: they stay comparable
        test["workload"] = request.workload
    if checked.engine != "child":  # llama-server's figures are its own (sampling, HTTP): never mixed with the child's
        test["engine"] = checked.engine
        if checked.scenarios:  # the figures are those of these requests
            test["scenarios_sha256"] = scenarios_sha256(checked.scenarios)
        else:
            test["tg_prompt_sha256"] = hashlib.sha256(checked.tg_prompt.encode()).hexdigest()[:16]
        build = env.llama_cpp_build
    else:
        build = f"llama-cpp-python {env.llama_cpp_python}, {env.llama_cpp_build}"
    fingerprint = Fingerprint(model_sha256(checked.model.path), env.hardware_key(), build, test)
    settings = StudySettings(trials=request.trials, objective=objective_of(request), sampler=request.sampler,
                             seed=request.seed, timeout_s=checked.timeout_s, trial_timeout_s=checked.trial_timeout_s)
    name = request.study_name or default_study_name(checked.model.file_name, env.gpu_name, request.depth,
                                                    request.workload, checked.engine)
    if env.gpu_name and not env.gpu_offload:
        notes = [f"this machine has a GPU ({env.gpu_name}) but this llama-cpp-python is a CPU build: every trial "
                 "runs on the CPU, and the budget applies to RAM (`make tune CUDA=1` builds with CUDA)"]
    else:
        notes = []
    tuner = Tuner(storage=storage or make_storage(request.storage), study_name=name, model=checked.model,
                  space=space, launcher=launcher, env=env, fingerprint=fingerprint,
                  limits=Limits(budget, checked.min_headroom, checked.min_ctx, request.min_stream_tps,
                                request.max_capped),
                  settings=settings,
                  baselines=baselines, tracker=tracker, gpu_index=gpu_index)
    tuner.notes[:0] = notes
    if checked.tg_prompt:  # verify replays the same request
        tuner.study.set_user_attr(TG_PROMPT_ATTR, checked.tg_prompt)
    if checked.scenarios:  # verify, compare and workers answer the same requests
        tuner.study.set_user_attr(SCENARIOS_ATTR, [sc.to_dict() for sc in checked.scenarios])
    saved = {k: v for k, v in asdict(request).items()
             if k not in ("storage", "study_name", "tg_prompt_text", "scenario_lines")}
    saved["model"] = checked.model.path
    stored = tuner.study.user_attrs.get(REQUEST_ATTR)
    if stored is None or (record_request and stored != saved):
        if stored is not None and stored.get("trials") != request.trials:
            tuner.notes.append(f"--trials changed from {stored.get('trials')} to {request.trials}; "
                               "workers of this study follow")
        tuner.study.set_user_attr(REQUEST_ATTR, saved)
    return tuner
