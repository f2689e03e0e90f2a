"""``python kill_at_step.py STEP [facerec-train arguments]``: facerec-train that SIGKILLs itself right
after optimiser step STEP, once that step's checkpoint (if one is due) is written: a crash at an
exact point for the resume tests, registered as a trainer callback (no test hook in the loop)."""

from __future__ import annotations

import os
import signal
import sys

from training.__main__ import main


def kill_at(step: int):
    def callback(trainer) -> None:
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[2:], callbacks=[kill_at(int(sys.argv[1]))]))
