"""Run ``cl-ext run RECIPE`` and stop the process at a chosen point (a test harness, not a test).

    python tests/kill_run.py RECIPE SIGNAL POINT

SIGNAL is KILL, INT or TERM; POINT is one of
- ``iteration:N``: in the N-th training iteration (1-based, counted over the whole run), mid-epoch;
- ``checkpoint:K``: right after the K-th experience's checkpoint is written, between experiences;
- ``phase:NAME:N``: at the N-th step (counted over the whole run) of the phases whose name
  contains NAME (exemplar selection, UCIR/EEIL finetuning, BiC stage 2, SLNID importance).

The signal comes from the process itself at exactly that point, so the test knows where the
run stopped; what the process does after it (nothing, for SIGKILL) is the real thing.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import cl_ext.runner as runner
from cl_ext import cli
from cl_ext.progress import listening


def main(recipe: str, signal_name: str, point: str) -> None:
    torch.set_num_threads(1)  # as the tests: bit-identity needs the same reduction order
    # A shell starts background jobs with SIGINT ignored (POSIX), and Python then leaves it
    # ignored: give the run the Ctrl-C a terminal would deliver, wherever the suite was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sig = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}[signal_name]
    kind, *args = point.split(":")
    count = {"n": 0}

    def stop() -> None:
        os.kill(os.getpid(), sig)

    if kind == "iteration":
        original = runner.ProgressPlugin.after_training_iteration

        def after_training_iteration(self, strategy, **kwargs):
            original(self, strategy, **kwargs)
            count["n"] += 1
            if count["n"] == int(args[0]):
                stop()

        runner.ProgressPlugin.after_training_iteration = after_training_iteration
    elif kind == "checkpoint":
        save = runner.save_checkpoint

        def save_checkpoint(*a, **kw):
            save(*a, **kw)
            count["n"] += 1
            if count["n"] == int(args[0]):
                stop()

        runner.save_checkpoint = save_checkpoint
    elif kind != "phase":
        raise SystemExit(f"unknown point {point!r}")

    def on_phase(event) -> None:
        if kind == "phase" and args[0] in event.name and event.kind == "advance":
            count["n"] += 1
            if count["n"] == int(args[1]):
                stop()

    with listening(on_phase):
        sys.argv = ["cl-ext", "run", recipe]
        cli.main()


if __name__ == "__main__":
    main(*sys.argv[1:])
