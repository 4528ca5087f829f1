"""The llama-server engine (``--engine llama-server``): each configuration measured in the llama-server a user runs.

:class:`ServerLauncher` is a :class:`~llama_tuner.measure.launcher.Launcher`: for each configuration it starts
llama-server with the configuration's flags (:func:`~llama_tuner.measure.server_args.llama_server_args`, spelled
for that binary), replays the test over HTTP (:mod:`llama_tuner.measure.server_bench`: pp as the server's
``prompt_per_second``, tg as its ``predicted_per_second``, speculative drafts as its ``draft_n`` and
``draft_n_accepted``), and stops it; consecutive configurations with the same flags (a sweep of test sizes)
share one start. What the child cannot measure is searched here: speculative decoding (``--spec-type``, a draft
model).

Devices come from llama.cpp itself (``--list-devices``): a CUDA, ROCm, Vulkan, Metal or SYCL build offloads to
its GPU whether or not NVML knows it. NVML stays the per-process VRAM peak where it exists; elsewhere the peak is
what llama.cpp allocated on the GPU (the buffer lines of its log). A server that does not start, crashes, runs out
of memory (an allocation failure in its log) or stops answering is a recorded result with the decisive log line.
Nothing here imports llama_cpp, and nothing is Linux-only: processes are started, sampled and stopped through
subprocess and psutil.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import replace
from itertools import groupby
from typing import Iterator, Sequence

import psutil

from llama_tuner.errors import UserError
from llama_tuner.measure.config import BenchConfig, InvalidConfig
from llama_tuner.measure.environment import machine_environment
from llama_tuner.measure.launcher import Launcher
from llama_tuner.measure.llama_server import Device, LlamaServer, list_devices
from llama_tuner.measure.probe import GpuProbe, NoGpuProbe, visible_gpu_index
from llama_tuner.measure.result import Environment, Status, TrialResult
from llama_tuner.measure.scenarios import Scenario
from llama_tuner.measure.server_args import llama_server_args
from llama_tuner.measure.server_bench import (Replay, ServedRun, Vocabulary, serve_and_measure_each,
                                              vocabulary)

TG_PROMPT_FILE = os.path.join(os.path.dirname(__file__), "tg_prompt.txt")


def bundled_tg_prompt() -> str:
    """The request tg answers by default with this engine: a code edit whose answer repeats most of its prompt,
    the case speculative decoding is for (written for this project, public domain)."""
    with open(TG_PROMPT_FILE, encoding="utf-8") as f:
        return f.read()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class ServerLauncher(Launcher):
    """Measures configurations in llama-server (see the module's docstring)."""

    def __init__(self, server: LlamaServer, probe: GpuProbe | None = None, *, timeout_s: float = 600.0,
                 gpu_index: int | None = None, tg_prompt: str = "", devices: list[Device] | None = None,
                 env: dict[str, str] | None = None, scenarios: Sequence[Scenario] = ()):
        """Measure with the llama-server ``server``; one configuration may take ``timeout_s`` to start and as
        long for each request; ``tg_prompt``: the request in words whose answer tg measures (pp-tg tests), else
        random token ids as the child draws them; ``devices``: its ``--list-devices`` (asked of it if None);
        ``env``: variables set for the server (a worker's ``CUDA_VISIBLE_DEVICES``); ``scenarios``: the requests
        the scenarios workload answers (:mod:`llama_tuner.measure.scenarios`).

        Raises:
            UserError: ``server`` does not answer ``--list-devices``.
        """
        self.server = server
        self.probe = probe or NoGpuProbe()
        self.timeout_s = timeout_s
        self.tg_prompt = tg_prompt
        self.env = env or {}
        self.scenarios = tuple(scenarios)
        self.devices = list_devices(server.path) if devices is None else devices
        self.gpu_index = gpu_index if gpu_index is not None else (
            visible_gpu_index(self.probe) if self.probe.gpus() and self.devices else None)
        self._vocab: dict[str, Vocabulary] = {}

    def environment(self) -> Environment:
        """This machine, and the llama-server build: its version, and whether it offloads (a device listed)."""
        env = machine_environment(self.probe, self.gpu_index)
        env.engine, env.llama_server = "llama-server", self.server.version
        env.llama_cpp_build = f"llama-server {self.server.version}"
        env.gpu_offload = bool(self.devices)
        if self.devices and not env.gpu_name:  # a GPU NVML does not know: ROCm, Vulkan, Metal, SYCL
            env.gpu_name, env.vram_total_bytes = self.devices[0].description, self.devices[0].total_bytes
        return env

    def gpu_free_bytes(self) -> int | None:
        if self.gpu_index is not None:
            return self.probe.memory(self.gpu_index).free
        if not self.devices:
            return None
        fresh = list_devices(self.server.path)
        return (fresh or self.devices)[0].free_bytes

    def argv(self, model_path: str, config: BenchConfig) -> list[str]:
        """The command line that measures ``config``: its exported flags, spelled for this binary.

        Raises:
            UserError: the binary lacks a flag the configuration needs.
        """
        return llama_server_args(os.path.abspath(model_path), config, program=self.server.path, server=self.server)

    def measure(self, model_path: str, configs: Sequence[BenchConfig]) -> Iterator[TrialResult]:
        env = self.environment()
        ready: list[tuple[BenchConfig, list[str] | None, TrialResult | None]] = []
        for cfg in configs:
            try:
                resolved = cfg.resolved()
                ready.append((resolved, self.argv(model_path, resolved), None))
            except (InvalidConfig, UserError) as exc:
                reason = str(exc) if isinstance(exc, InvalidConfig) else f"{exc.problem}: {exc.fix}"
                ready.append((cfg, None, TrialResult(Status.INVALID, cfg, model_path, reason=reason,
                                                     started_at=_now(), env=env)))
        for key, group in groupby(ready, key=lambda item: item[1] and tuple(item[1])):
            items = list(group)
            if key is None:
                yield from (r for _, _, r in items)
                continue
            yield from self._serve(model_path, list(key), [cfg for cfg, _, _ in items], env)

    def _serve(self, model_path: str, argv: list[str], configs: list[BenchConfig], env: Environment
               ) -> Iterator[TrialResult]:
        vocab = self._vocab.get(model_path) or self._vocab.setdefault(model_path, vocabulary(model_path))
        started = _now()
        ram_before = psutil.virtual_memory().available
        vram_free = self.probe.memory(self.gpu_index).free if self.gpu_index is not None else (
            self.devices[0].free_bytes if self.devices else None)
        replays = [Replay.of(c, text=self.tg_prompt, scenarios=self.scenarios) for c in configs]
        if configs[0].speculative and any(r.text or r.scenarios for r in replays):
            runs = [self._fresh_each_time(argv, r, vocab) for r in replays]
        else:
            runs = serve_and_measure_each(argv, replays, vocab, label="trial", version=self.server.version,
                                          start_timeout_s=self.timeout_s, request_timeout_s=self.timeout_s,
                                          probe=self.probe, gpu_index=self.gpu_index, env=self.env)
        for cfg, run in zip(configs, runs):
            r = run.to_result(cfg, model_path, n_prompt=cfg.n_prompt or None, n_gen=cfg.n_gen or None)
            r = replace(r, env=Environment(**env.__dict__), started_at=started, buffers=run.buffers or None,
                        ram_available_before_bytes=ram_before, vram_free_before_bytes=vram_free)
            if r.peak_vram_bytes is None and self.devices and r.buffers:  # no NVML: what llama.cpp allocated
                r = replace(r, peak_vram_bytes=r.allocated_bytes("gpu"))
            yield r

    def _fresh_each_time(self, argv: list[str], replay: Replay, vocab: Vocabulary) -> ServedRun:
        """Each repetition in a server of its own, merged: a speculative server's n-gram tables learn every answer,
        so the same request asked again is drafted from its own earlier answer (measured on the demo model with
        ngram-mod: 81 tokens drafted of the first answer's 128, then all 126; tg 45 then 55 t/s), which no user's
        next request is. The first answer of a fresh server is the figure (of the scenarios: one pass over the
        file, whose later requests may learn from the earlier ones, as in a user's server)."""
        merged: ServedRun | None = None
        for rep in range(replay.repetitions):
            [run] = serve_and_measure_each(argv, [replace(replay, repetitions=1, seed=replay.seed + rep)], vocab,
                                           label="trial", version=self.server.version,
                                           start_timeout_s=self.timeout_s, request_timeout_s=self.timeout_s,
                                           probe=self.probe, gpu_index=self.gpu_index, env=self.env)
            if merged is None:
                merged = run
            else:
                for name in ("pp_n", "pp_ms", "tg_n", "tg_ms", "draft_n", "draft_accepted"):
                    getattr(merged, name).extend(getattr(run, name))
                merged.answers += [replace(a, repetition=rep) for a in run.answers]
                merged.peak_rss_bytes = max(merged.peak_rss_bytes or 0, run.peak_rss_bytes or 0) or None
                if run.peak_vram_bytes is not None:
                    merged.peak_vram_bytes = max(merged.peak_vram_bytes or 0, run.peak_vram_bytes)
                merged.wall_time_s = (merged.wall_time_s or 0) + (run.wall_time_s or 0)
                if not run.ok:
                    merged.status, merged.reason, merged.exit_code, merged.signal, merged.log_tail = (
                        run.status, run.reason, run.exit_code, run.signal, run.log_tail)
            if not run.ok:
                break
        return merged
