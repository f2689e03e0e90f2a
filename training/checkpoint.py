"""Crash-safe checkpoints: a directory per step, committed by one atomic rename.

Layout of ``<run_dir>/checkpoints``::

    step_00001000/          a complete checkpoint (only ever appears fully written)
      model.pt              backbone weights, step, epoch (rank 0)
      rank0.pt, rank1.pt..  per-rank state: the loss module's class-centre shard and margin RNG,
                            optimiser, scaler, scheduler, sampler position, RNG states
      config.yaml           the resolved config of the run
      meta.json             step, epoch, world size, validation metrics
    step_00002000.tmp/      a write in progress or interrupted by a crash: never read
    best.json               {"step": ..., "metric": ...}: which step directory is the best so far

Every file is written to a temporary name in its directory, flushed, fsynced and os.replace'd; the
step directory is then renamed from ``.tmp`` and its parent fsynced. A SIGKILL at any instant
leaves either the previous checkpoints or the new one, never half of one.

Test-only hook: ``FACEREC_TEST_KILL_IN_CHECKPOINT_WRITE=<step>`` makes the process SIGKILL itself
half-way through writing that step's first file, so the crash test needs no timing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import torch

KILL_IN_WRITE_ENV = "FACEREC_TEST_KILL_IN_CHECKPOINT_WRITE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms/filesystems cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _KillHalfWay:
    """File wrapper that SIGKILLs the process once half of ``expected`` bytes are on disk."""

    def __init__(self, f, expected: int):
        self.f, self.left = f, max(expected // 2, 1)

    def write(self, data) -> int:
        n = self.f.write(data)
        self.left -= n
        if self.left <= 0:
            self.f.flush()
            os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def flush(self) -> None:
        self.f.flush()


def _write_atomically(path: Path, writer: Callable[[Any], None], kill_tag: str | None = None,
                      size_hint: int = 0) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            target = f
            if kill_tag is not None and os.environ.get(KILL_IN_WRITE_ENV) == kill_tag:
                target = _KillHalfWay(f, size_hint or 2)
            writer(target)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _write_atomically(Path(path), lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: Path, kill_tag: str | None = None) -> None:
    size_hint = 0
    if kill_tag is not None and os.environ.get(KILL_IN_WRITE_ENV) == kill_tag:
        size_hint = _serialised_size(obj)
    _write_atomically(Path(path), lambda f: torch.save(obj, f), kill_tag, size_hint)


def _serialised_size(obj: Any) -> int:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "meta.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_best(root: Path) -> dict | None:
    file = Path(root) / "best.json"
    return json.loads(file.read_text()) if file.exists() else None


def mark_best(root: Path, step: int, metric: str, value: float) -> None:
    info = {"step": step, "dir": step_dir(root, step).name, "metric": metric, "value": value}
    atomic_write_bytes(Path(root) / "best.json", json.dumps(info, indent=1).encode())


def save_checkpoint(
    root: Path,
    step: int,
    rank: int,
    world_size: int,
    model_state: dict | None,
    rank_state: dict,
    config_yaml: str,
    meta: dict,
    barrier: Callable[[], None] = lambda: None,
    keep: int = 2,
) -> Path:
    """Write one checkpoint collectively (every rank calls this); returns the final directory.

    ``model_state`` is only needed on rank 0. ``keep`` complete checkpoints are kept, plus the
    one ``best.json`` points at.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    tag = str(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crash during an earlier attempt at this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    atomic_torch_save(rank_state, tmp / f"rank{rank}.pt", kill_tag=tag)
    barrier()
    if rank == 0:
        atomic_torch_save(model_state, tmp / "model.pt", kill_tag=tag)
        atomic_write_bytes(tmp / "config.yaml", config_yaml.encode())
        meta = {**meta, "step": step, "world_size": world_size}
        atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=1, default=float).encode())
        if final.exists():  # the same step saved twice (e.g. end of epoch == periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(root)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    best = read_best(root)
    protected = {best["dir"]} if best else set()
    complete = list_checkpoints(root)
    for _, path in complete[: max(len(complete) - max(keep, 1), 0)]:
        if path.name not in protected:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):  # interrupted writes of earlier steps
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, rank: int, world_size: int, map_location="cpu") -> tuple[dict, dict, dict]:
    """(model_state, rank_state, meta) of a checkpoint directory, checked against the world size."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("world_size", 1) != world_size:
        raise RuntimeError(
            f"{path} was written by {meta.get('world_size')} processes, this run has {world_size}: "
            "class centres are sharded per process, so resume with the same number of processes "
            "(or start a new run from model.pt's weights)"
        )
    model_state = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
    rank_state = torch.load(path / f"rank{rank}.pt", map_location=map_location, weights_only=True)
    return model_state, rank_state, meta


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """``None`` -> fresh run; ``'auto'`` -> latest complete checkpoint or None; else a path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if path.is_dir() and _STEP_DIR.match(path.name):
        return path
    if path.is_dir():  # a run directory or its checkpoints folder
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint under {path}")
        return found
    raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory")


def capture_rng(device, loader_generator: torch.Generator | None = None) -> dict:
    """Every generator a resumed run needs to continue identically, in weights_only-safe types."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None,
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }
    return state


def restore_rng(state: dict, device, loader_generator: torch.Generator | None = None) -> None:
    import random

    import numpy as np

    random.setstate(_to_tuple(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
