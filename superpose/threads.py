"""CPU threads per process: on a shared machine, OpenMP threads waiting for a busy core cost more than they give."""
from __future__ import annotations

import functools
import os

import torch

from .config import Config
from .distributed import Runtime
from .launch import local_world_size


def set_threads(cfg: Config, runtime: Runtime, say) -> None:
    """CPU threads of this process: ``train.threads``, or (0) the cores no one else is using."""
    if runtime.device.type != "cpu" or (not cfg.train.threads and "OMP_NUM_THREADS" in os.environ):
        return  # an explicit OMP_NUM_THREADS stands unless train.threads is set
    threads = cfg.train.threads or default_threads()
    torch.set_num_threads(threads)
    if not cfg.train.threads:
        cores, load = machine_load()
        say(f"{threads} CPU thread(s) per process ({cores} cores, load average {load:.1f} when superpose started; "
            "train.threads sets it)")


@functools.cache
def machine_load() -> tuple[int, float]:
    """(cores this process may use, the 1-minute load average) when first asked: cached, so that every
    run of one command (the arms of a comparison) takes the same decision."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, os.getloadavg()[0]


def default_threads() -> int:
    """All of this rank's share of the free cores, at least 1. bench/bench_threads.py on the
    project's 2-core machine: a quick-start step took 0.51 s with 1 thread and 0.31 s with 2 when
    the machine was otherwise idle, but 0.52 s and 3.40 s when one other process ran (OpenMP
    threads waiting for a busy core); the quick start with torch's default 2 threads on a shared
    machine took 44 CPU-minutes instead of 12.5. The load average says which case this is."""
    cores, load = machine_load()
    ranks = local_world_size()  # torchrun's processes on this machine share its cores
    return max(1, min(cores // ranks, round(max(0.0, cores - load) / ranks)))
