"""Crash-safe checkpoints: a directory per step, committed by one atomic rename.

Layout of ``<run_dir>/checkpoints``::

    step_00001000/          a complete checkpoint (only ever appears fully written)
      model.pt              backbone weights, step, epoch (rank 0)
      rank0.pt, rank1.pt..  per-rank state: the loss module's class-centre shard and margin RNG,
                            optimiser, scaler, scheduler, sampler position, RNG states
      config.yaml           the resolved config of the run
      meta.json             step, epoch, world size, validation metrics
    step_00002000.tmp/      a write in progress or interrupted by a crash: never read
    step_00001000.old/      the previous copy of a step being saved again (complete; read only while
                            no step_00001000/ exists)
    step_00001000.old.trash/  a directory being deleted: never read
    best.json               {"step": ..., "metric": ...}: which step directory is the best so far

Every file is written to a temporary name in its directory, flushed, fsynced and os.replace'd; the
step directory is then renamed from ``.tmp`` and its parent fsynced. A SIGKILL at any instant
leaves either the previous checkpoints or the new one, never half of one.

Saving a step that already has a checkpoint (a run resumed from an earlier checkpoint reaches
steps it saved before; the trainer itself writes one checkpoint per step) renames the old
directory aside to ``.old`` (which :func:`list_checkpoints` reads only while the step has no other
directory), commits the new one and only then deletes the old one, renamed to ``.trash`` first,
so a half-deleted directory never carries a readable name. :func:`recover_checkpoints` (run by
the trainer before it looks for a checkpoint) puts an ``.old`` back when its replacement never
arrived and deletes the leftovers.

``meta.json`` records the run's best step so far (``best``); ``best.json`` is rewritten from it
right after the commit, and pruning also protects the best step of the newest checkpoint's meta,
so a crash between the commit and ``best.json`` cannot lose the true best checkpoint.

Test-only hook: ``FACEREC_TEST_KILL_IN_CHECKPOINT_WRITE=<step>`` makes the process SIGKILL itself
half-way through writing that step's first file, so the crash test needs no timing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

KILL_IN_WRITE_ENV = "FACEREC_TEST_KILL_IN_CHECKPOINT_WRITE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OLD = ".old"  # a replaced checkpoint, kept until its replacement is committed
_TRASH = ".trash"  # a directory being deleted


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


def is_complete(path: Path) -> bool:
    """Whether a step directory holds every file of a checkpoint (meta, config, model, one state
    file per rank). A committed directory always does; the check also rejects a directory that
    an older version of this module left half-deleted when it re-saved a step."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    names = ["model.pt", "config.yaml"] + [f"rank{r}.pt" for r in range(int(meta.get("world_size", 1)))]
    return all((path / name).is_file() for name in names)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first.

    While a step is being saved again, its previous copy is ``step_N.old`` for a moment; such a
    copy stands in for step N as long as no ``step_N`` exists (also after a crash in that moment,
    until :func:`recover_checkpoints` renames it back), so step N is never missing."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found[int(m.group(1))] = p
    for p in root.glob(f"step_*{_OLD}"):
        m = _STEP_DIR.match(p.name[: -len(_OLD)])
        if m and int(m.group(1)) not in found and p.is_dir() and is_complete(p):
            found[int(m.group(1))] = p
    return sorted(found.items())


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def _discard(path: Path) -> None:
    """Delete a directory under a name no reader accepts: renamed to ``.trash`` first."""
    trash = path.with_name(path.name + _TRASH)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def recover_checkpoints(root: Path) -> list[str]:
    """Undo or finish what a crash interrupted; call on rank 0 before reading checkpoints.

    An ``.old`` directory whose step has no committed replacement is renamed back (it is a
    complete checkpoint: it is only deleted after the replacement's commit); otherwise it is
    deleted, as are ``.trash`` directories and step directories that are not complete. Then
    ``best.json`` is made to agree with the best step recorded in the newest checkpoint's meta.
    Returns a note per repair (for the run log).
    """
    root = Path(root)
    notes: list[str] = []
    if not root.is_dir():
        return notes
    for trash in root.glob(f"step_*{_TRASH}"):
        shutil.rmtree(trash, ignore_errors=True)
    for path in root.iterdir():
        if _STEP_DIR.match(path.name) and path.is_dir() and not is_complete(path):
            _discard(path)
            notes.append(f"deleted the incomplete checkpoint directory {path}")
    for old in sorted(root.glob(f"step_*{_OLD}")):
        final = old.with_name(old.name[: -len(_OLD)])
        if not (_STEP_DIR.match(final.name) and old.is_dir()):
            continue
        if final.is_dir():
            _discard(old)
        else:
            os.replace(old, final)
            _fsync_dir(root)
            notes.append(f"restored {final.name}: a crash interrupted its replacement")
    found = list_checkpoints(root)
    best = read_meta(found[-1][1]).get("best") if found else None
    if best and _best_info(root, best) != read_best(root):
        mark_best(root, best["step"], best["metric"], best["value"])
        notes.append(f"best.json now names step {best['step']} (the newest checkpoint's best)")
    return notes


def set_aside_newer(root: Path, resume_from: Path) -> list[str]:
    """Resuming from step N of this run (``resume_from`` is a step directory of ``root``) while the
    run has later checkpoints (an abandoned branch): move those into ``abandoned_<time>/`` (never
    read as checkpoints, nothing deleted), so that pruning and ``--resume auto`` follow the resumed
    branch; ``best.json`` then names the best step that the resumed checkpoint knew of. A checkpoint
    of another run changes nothing. Call on rank 0. Returns a note per move (for the run log)."""
    root, resume_from = Path(root), Path(resume_from)
    match = _STEP_DIR.match(resume_from.name)
    if not match or resume_from.resolve().parent != root.resolve():
        return []
    step = int(match.group(1))
    newer = [(s, p) for s, p in list_checkpoints(root) if s > step]
    if not newer:
        return []
    aside = root / time.strftime("abandoned_%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for _, path in newer:
        os.replace(path, aside / path.name.removesuffix(_OLD))
    _fsync_dir(root)
    notes = [f"moved {len(newer)} checkpoint(s) after step {step} (steps {', '.join(str(s) for s, _ in newer)}) "
             f"to {aside}: the run continues from step {step}"]
    best = read_meta(step_dir(root, step)).get("best") if step_dir(root, step).is_dir() else None
    current = read_best(root)
    if best:
        mark_best(root, best["step"], best["metric"], best["value"])
    elif current and current["step"] > step:
        (root / "best.json").unlink()
    return notes


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_best(root: Path) -> dict | None:
    file = Path(root) / "best.json"
    return json.loads(file.read_text()) if file.exists() else None


def _best_info(root: Path, best: dict) -> dict:
    return {"step": best["step"], "dir": step_dir(root, best["step"]).name, "metric": best["metric"],
            "value": best["value"]}


def mark_best(root: Path, step: int, metric: str, value: float) -> None:
    info = _best_info(root, {"step": step, "metric": metric, "value": value})
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
    best: dict | None = None,
) -> Path:
    """Write one checkpoint collectively (every rank calls this); returns the final directory.

    ``model_state`` is only needed on rank 0. ``best`` (rank 0): ``{"step", "metric", "value"}``
    of the run's best validation so far, stored in meta.json and then in best.json. ``keep``
    complete checkpoints are kept, plus the best one (named by best.json or by the newest meta).
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    tag = str(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        recover_checkpoints(root)  # an interrupted replacement must not be mistaken for garbage
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
        if best is not None:
            meta["best"] = {"step": int(best["step"]), "metric": best["metric"], "value": best["value"]}
        atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=1, default=float).encode())
        old = None
        if final.exists():
            # The same step saved again (a run resumed from an earlier checkpoint): the old copy
            # goes aside (still listed while no step directory exists), the new one is committed,
            # and only then is the old one deleted.
            old = final.with_name(final.name + _OLD)
            os.replace(final, old)
            _fsync_dir(root)
        os.replace(tmp, final)  # the commit point
        _fsync_dir(root)
        if old is not None:
            _discard(old)
        if best is not None and _best_info(root, meta["best"]) != read_best(root):
            mark_best(root, meta["best"]["step"], meta["best"]["metric"], meta["best"]["value"])
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    complete = list_checkpoints(root)
    best = read_best(root)
    protected = {best["dir"]} if best else set()
    if complete:  # best.json may lag the newest commit by a crash: its meta names the true best
        newest_best = read_meta(complete[-1][1]).get("best")
        if newest_best:
            protected.add(step_dir(root, newest_best["step"]).name)
    for _, path in complete[: max(len(complete) - max(keep, 1), 0)]:
        if path.name not in protected:
            _discard(path)
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
