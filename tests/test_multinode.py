"""A real 2-node torchrun job on loopback: two separate launchers (``--nnodes 2 --nproc_per_node 1``)
meet through a c10d rendezvous, train with gloo for a few steps, and end exactly where one
process on the concatenated batch ends.

Each launcher is what one machine of a cluster runs (docs/training.md, "2 nodes x 8 GPUs"); here
both are on 127.0.0.1 and share the run directory, as nodes share a filesystem. The trainer is the
real CLI (``-m training --config tiny_cpu``) on the bundled LFW sample; only the backbone is swapped
for the few-thousand-parameter ``tiny_face`` of the resume tests, which has no BatchNorm, so the
two-node run and the single-process run compute the same function of the same global batch; every
process computes in float64 (``FLOAT64``), so the comparison holds on any CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_checkpoint_resume import FLOAT64, FLOAT64_TOLERANCE, TINY_MODEL
from service.testing import free_port

pytestmark = pytest.mark.timeout(150)

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
GLOBAL_BATCH = 8
# Appended to the model plugin, which every training process imports: each process of the
# two-node job records what torchrun told it (its launcher is named by FACEREC_TEST_NODE).
PROBE = '''
import json as _json
import os as _os

if _os.environ.get("FACEREC_TEST_PROBE_DIR"):
    _keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "GROUP_WORLD_SIZE", "FACEREC_TEST_NODE")
    with open(_os.path.join(_os.environ["FACEREC_TEST_PROBE_DIR"], f"env_{_os.getpid()}.json"), "w") as _f:
        _json.dump({k: _os.environ.get(k) for k in _keys}, _f)
'''


def overrides(run_dir: Path, batch: int) -> list[str]:
    sets = [
        "model.name=tiny_face", "model.imports=[tiny_face_plugin]", "model.kwargs={embedding_size: 16}",
        f"data.path={REPO / 'tests' / 'data' / 'lfw_sample'}", f"data.batch_size={batch}", "data.workers=0",
        "loss.unpg=true",  # features gathered across the nodes
        "val.kind=none", f"train.max_steps={STEPS}", "train.log_every=1", "train.checkpoint_every=100",
        "train.progress=false",
    ]
    return ["--config", "tiny_cpu", "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]


def environment(tmp: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(tmp), str(REPO), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return env


def test_two_torchrun_nodes_on_loopback_equal_one_process(tmp_path):
    (tmp_path / "tiny_face_plugin.py").write_text(TINY_MODEL + FLOAT64 + PROBE)
    env = environment(tmp_path)
    probes = tmp_path / "probes"
    probes.mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    shared_run = tmp_path / "two_nodes"
    nodes = []
    for node in range(2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                    "--rdzv_id", "facerec-multinode-test",
                    # node 0 hosts the rendezvous store; both advertise the loopback address
                    "--rdzv_conf", f"is_host={'true' if node == 0 else 'false'}", "--local_addr", "127.0.0.1",
                    "--max_restarts", "0", "--monitor_interval", "0.1",
                    "-m", "training", *overrides(shared_run, GLOBAL_BATCH // 2)]
        log = tmp_path / f"node{node}.log"
        with open(log, "wb") as out:  # the launcher keeps its own copy of the descriptor
            node_env = dict(env, FACEREC_TEST_PROBE_DIR=str(probes), FACEREC_TEST_NODE=f"node{node}")
            nodes.append((subprocess.Popen(launcher, cwd=tmp_path, env=node_env, stdout=out,
                                           stderr=subprocess.STDOUT), log))
    # The reference runs meanwhile: one plain process, the whole global batch.
    single = subprocess.Popen([sys.executable, "-m", "training", *overrides(tmp_path / "one", GLOBAL_BATCH)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    outputs = []
    try:
        single_out, _ = single.communicate(timeout=120)
        for proc, log in nodes:
            proc.wait(timeout=120)
            outputs.append(log.read_text())
    finally:
        for proc in [single] + [p for p, _ in nodes]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert single.returncode == 0, single_out[-4000:]
    for (proc, _), out in zip(nodes, outputs):
        assert proc.returncode == 0, out[-4000:]

    # Two nodes, world size 2: one process per launcher, the rendezvous gave the launchers
    # different node ranks, and the checkpoint was written by two processes.
    seen = sorted((json.loads(f.read_text()) for f in probes.glob("env_*.json")), key=lambda e: e["RANK"])
    assert [e["FACEREC_TEST_NODE"] for e in seen] in (["node0", "node1"], ["node1", "node0"]), seen
    assert [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) for e in seen] == [("0", "2", "0"), ("1", "2", "0")]
    assert sorted(e["GROUP_RANK"] for e in seen) == ["0", "1"]
    assert {e["GROUP_WORLD_SIZE"] for e in seen} == {"2"}
    two = shared_run / "checkpoints" / f"step_{STEPS:08d}"
    one = tmp_path / "one" / "checkpoints" / f"step_{STEPS:08d}"
    assert json.loads((two / "meta.json").read_text())["world_size"] == 2
    assert json.loads((one / "meta.json").read_text())["world_size"] == 1
    steps = [json.loads(line)["step"] for line in (shared_run / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))

    # The two-node backbone equals the single-process one on the same global batch ...
    m1 = torch.load(one / "model.pt", weights_only=True)["model"]
    m2 = torch.load(two / "model.pt", weights_only=True)["model"]
    start = torch.load(one / "rank0.pt", weights_only=True)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m1[k].dtype == m2[k].dtype == torch.float64, (k, m1[k].dtype)
        torch.testing.assert_close(m2[k], m1[k], msg=k, **FLOAT64_TOLERANCE)
    # ... and so do the class centres, sharded 12 + 12 over the nodes.
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    shards = [r["loss"]["centres.weight"] for r in ranks]
    assert [s.shape[0] for s in shards] == [12, 12]
    torch.testing.assert_close(torch.cat(shards), start["loss"]["centres.weight"], **FLOAT64_TOLERANCE)

    # Both nodes hold the same backbone: their optimiser states (SGD momentum, which sums every
    # step's all-reduced gradient) are bit-identical for every backbone parameter. The centres'
    # momenta belong to different shards and differ.
    def backbone_momenta(rank_state):
        opt = rank_state["optimizer"]
        ids = [i for g in opt["param_groups"] if g["name"].startswith("backbone") for i in g["params"]]
        return [opt["state"][i]["momentum_buffer"] for i in ids]

    mom0, mom1 = (backbone_momenta(r) for r in ranks)
    # Every backbone parameter got gradients (so, with lr > 0, the weights moved: the comparisons
    # above are not of two untouched initialisations).
    assert len(mom0) == len(m1) and all(m.abs().sum() > 0 for m in mom0)
    for a, b in zip(mom0, mom1):
        assert torch.equal(a, b)
