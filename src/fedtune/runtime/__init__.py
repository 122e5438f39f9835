"""Runtimes: one round loop (:mod:`.loop`) over transports (in-process: :mod:`.inprocess`;
Flower: :mod:`fedtune.flower.transport`), with faults, checkpoints and the run directory."""

from .loop import RunResult, Transport, run, simulate

__all__ = ["RunResult", "Transport", "run", "simulate"]
