"""The teacher cache and `facerec teach`: resumable, keyed by content, multi-process = one process.

Runs the real ONNX teacher (a tiny exported model) on bundled LFW sample photos, which it detects
and aligns itself. Interruptions are deterministic: a process running the real teacher kills
itself (SIGKILL) as it starts its third batch; ``stop_after`` ends a run at a batch boundary; and a
torn shard tail (half a row, half an index line: what a kill during a write leaves) is written
by hand.
"""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from teacher_helpers import export_tiny, sample_paths  # noqa: E402

from facerec.teachers import TeacherCache, TeacherCacheError, content_hash, file_hash  # noqa: E402
from facerec.teachers.compute import TeacherSpec, teach  # noqa: E402

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teach")
    model = root / "tiny_r1.onnx"
    export_tiny(model)
    tree = root / "tree"
    for path in sample_paths()[::8][:12]:  # 12 photos of several people
        (tree / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tree / path.parent.name / path.name)
    # the same bytes under a second name (and identity): must be one cache entry
    first = sorted(tree.glob("*/*.jpg"))[0]
    (tree / "Zz_copy").mkdir()
    shutil.copy(first, tree / "Zz_copy" / "copy.jpg")
    spec = TeacherSpec("onnx", {"path": str(model)})
    return tree, spec, spec.build()


def items_of(tree):
    return [(("file", str(p)),) * 2 for p in sorted(tree.glob("*/*.jpg"))]


def full_run(setup, out):
    tree, spec, teacher = setup
    return teach(spec, items_of(tree), out, batch_size=4, progress=False, teacher=teacher)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "cache"
    summary = full_run(setup, out)
    return out, summary


def hashes_of(tree):
    return [file_hash(p) for p in sorted(tree.glob("*/*.jpg"))]


def test_full_run_content_keying_and_lookup(setup, reference):
    tree, _, teacher = setup
    out, summary = reference
    assert summary.items == 13 and summary.unique == 12 and summary.computed == 12 and summary.cached == 0
    cache = TeacherCache(out)
    assert cache.teacher_id == teacher.teacher_id and cache.embedding_size == 16 and len(cache) == 12
    keys = hashes_of(tree)
    emb, found = cache.lookup(keys + ["0" * 64])
    assert found[:-1].all() and not found[-1] and np.all(emb[-1] == 0)
    copy = sorted(tree.glob("*/*.jpg")).index(tree / "Zz_copy" / "copy.jpg")
    np.testing.assert_array_equal(emb[0], emb[copy])  # same bytes, one entry
    np.testing.assert_allclose(np.linalg.norm(emb[:-1], axis=1), 1.0, atol=1e-5)
    # the cached values are the teacher's embeddings of those images
    from facerec.data.datasets import read_rgb

    direct = teacher.embed([read_rgb(p) for p in sorted(tree.glob("*/*.jpg"))[:3]])
    np.testing.assert_allclose(emb[:3], direct, atol=1e-6)


def test_interrupted_run_resumes_to_the_full_result(setup, reference, tmp_path):
    tree, spec, teacher = setup
    ref_out, _ = reference
    out = tmp_path / "cache"
    first = teach(spec, items_of(tree), out, batch_size=4, stop_after=5, progress=False, teacher=teacher)
    assert first.computed == 8  # whole batches: 5 rounds up to 2 batches of 4
    assert len(TeacherCache(out)) == 8
    # a kill in the middle of a write: half a row and half an index line at the shard's end
    shard = sorted(out.glob("shard-*.idx"))[0]
    with open(shard.with_suffix(".f32"), "ab") as f:
        f.write(b"\x00" * 30)
    with open(shard, "ab") as f:
        f.write(b"ab12")
    assert len(TeacherCache(out)) == 8
    second = teach(spec, items_of(tree), out, batch_size=4, progress=False, teacher=teacher)
    assert second.cached == 8 and second.computed == 4
    third = teach(spec, items_of(tree), out, batch_size=4, progress=False, teacher=teacher)
    assert third.computed == 0 and third.cached == 12
    keys = hashes_of(tree)
    got, found = TeacherCache(out).lookup(keys)
    want, _ = TeacherCache(ref_out).lookup(keys)
    assert found.all()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(list(out.glob("shard-*.idx"))) == 2  # a run that computes nothing opens no shard


def test_index_line_without_its_row_is_ignored(setup, tmp_path):
    from facerec.teachers.cache import CacheWriter

    writer = CacheWriter(tmp_path, "t-1-abc", 4, {})
    writer.add(["a" * 64, "b" * 64], np.eye(4, dtype=np.float32)[:2])
    writer.close()
    idx = next(tmp_path.glob("shard-*.idx"))
    with open(idx, "ab") as f:
        f.write(("c" * 64 + " 2\n").encode())  # its row was never written
    cache = TeacherCache(tmp_path)
    assert "a" * 64 in cache and "c" * 64 not in cache and len(cache) == 2
    with pytest.raises(TeacherCacheError, match="holds embeddings of teacher t-1-abc"):
        CacheWriter(tmp_path, "t-2-def", 4, {})


def test_two_workers_equal_one_process(setup, reference, tmp_path):
    tree, spec, _ = setup
    ref_out, _ = reference
    summary = teach(spec, items_of(tree), tmp_path / "cache", workers=2, batch_size=3, progress=False)
    assert summary.computed == 12
    keys = hashes_of(tree)
    got, found = TeacherCache(tmp_path / "cache").lookup(keys)
    want, _ = TeacherCache(ref_out).lookup(keys)
    assert found.all()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_no_face_is_recorded_and_not_retried(setup, tmp_path):
    import cv2

    _, spec, teacher = setup
    tree = tmp_path / "tree" / "someone"
    tree.mkdir(parents=True)
    cv2.imwrite(str(tree / "grey.png"), np.full((150, 130, 3), 128, np.uint8))
    (tree / "broken.jpg").write_bytes(b"not an image")
    items = items_of(tmp_path / "tree") + [(("file", str(tree / "grey.png")),) * 2]
    summary = teach(spec, items, tmp_path / "cache", progress=False, teacher=teacher)
    assert summary.computed == 2 and summary.no_face == 2
    cache = TeacherCache(tmp_path / "cache")
    assert len(cache) == 2 and not cache.lookup([file_hash(tree / "grey.png")])[1].any()
    again = teach(spec, items, tmp_path / "cache", progress=False, teacher=teacher)
    assert again.computed == 0 and again.cached == 2


def test_rec_input_is_keyed_by_the_record_bytes(setup, tmp_path):
    from facerec.data.datasets import read_rgb
    from facerec.data.recordio import FaceRecReader, write_face_rec
    from facerec.teachers.compute import read_bytes

    _, spec, teacher = setup
    crops = [np.ascontiguousarray(read_rgb(p)[69:181, 69:181]) for p in sample_paths()[:3]]
    write_face_rec(tmp_path / "rec", [(c, i) for i, c in enumerate(crops)])
    from facerec.cli.teach import rec_items

    items = rec_items(tmp_path / "rec")
    assert len(items) == 3
    teach(spec, items, tmp_path / "cache", progress=False, teacher=teacher)
    reader = FaceRecReader(tmp_path / "rec")
    keys = [content_hash(reader.read_raw(i)[0]) for i in range(3)]
    emb, found = TeacherCache(tmp_path / "cache").lookup(keys)
    assert found.all()
    # 112x112 records are taken as aligned crops, embedded as they are
    from facerec.data.recordio import decode_image

    direct = teacher.embed_crops(np.stack([decode_image(read_bytes(s)) for s, _ in items]))
    np.testing.assert_allclose(emb, direct, atol=1e-6)


@pytest.fixture
def restore_threads():
    """The CLI sets one thread for its process; give the test session its settings back."""
    import cv2
    import torch

    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    env = {k: os.environ.get(k) for k in keys}
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    yield
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv2_threads)


def test_cli_teach_and_its_errors(setup, tmp_path, capsys, monkeypatch, restore_threads):
    from facerec.cli import main

    tree, spec, teacher = setup
    model = spec.kwargs["path"]
    out = tmp_path / "cache"
    assert main(["teach", "onnx", "--model", model, "--data", str(tree), "--out", str(out),
                 "--batch-size", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"teacher {teacher.teacher_id}: 13 images (12 distinct), 0 already cached, 12 computed" in text
    with pytest.raises(SystemExit, match="holds embeddings of teacher"):
        main(["teach", "onnx", "--model", model, "-o", "bgr=true", "--data", str(tree), "--out", str(out),
              "--no-progress"])
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        main(["teach", "onnx", "--model", model, "-o", "bgr", "--data", str(tree), "--out", str(out)])
    with pytest.raises(SystemExit, match="--out DIR is needed"):
        main(["teach", "onnx", "--model", model, "--data", str(tree)])
    with pytest.raises(SystemExit, match="unknown teacher"):
        main(["teach", "nope", "--data", str(tree), "--out", str(out)])
    with pytest.raises(SystemExit, match="--preset pool needs --aligned"):
        main(["teach", "onnx", "--model", model, "--preset", "pool", "--out", str(out)])
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(SystemExit, match=r"facerec\[teacher\]"):
        main(["teach", "dlib", "--data", str(tree), "--out", str(tmp_path / "d")])


@pytest.mark.data
def test_pool_preset_keys_the_aligned_file_and_feeds_the_original(tmp_path):
    """--preset pool: the key is the aligned file the trainer reads, a photo teacher sees the
    photo it was cut from (facerec align's output naming), an unknown aligned file itself."""
    import argparse

    from facerec.cli.align import AlignJob
    from facerec.cli.teach import pool_items
    from facerec.data import protocol

    if not protocol.has_lfw():
        pytest.skip("shared face data absent (set FACEREC_DATA)")
    jobs = [AlignJob(str(p), i) for p, i in protocol.pool_images(None, ("orl",))[:2]]
    aligned = tmp_path / "pool112"
    for job in jobs:
        job.output(aligned).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(job.src, job.output(aligned))  # stands in for the aligned crop
    extra = aligned / "orl__s999" / "x.jpg"
    extra.parent.mkdir()
    shutil.copy(jobs[0].src, extra)
    args = argparse.Namespace(aligned=str(aligned), sources=["orl"], pins=None, data_root=None)
    items, from_photo = pool_items(args, photo_teacher=True)
    assert from_photo == 2 and len(items) == 3
    pairs = {key[1]: src[1] for key, src in items}
    for job in jobs:
        assert pairs[str(job.output(aligned))] == job.src
    assert pairs[str(extra)] == str(extra)
    items, from_photo = pool_items(args, photo_teacher=False)  # aligned teachers read the crops
    assert from_photo == 0 and all(k == s for k, s in items)
    # --sources keeps only the aligned folders of those sources (here a yale__ folder is left out)
    other = aligned / "yale__subject99" / "y.jpg"
    other.parent.mkdir()
    shutil.copy(jobs[0].src, other)
    items, _ = pool_items(args, photo_teacher=False)
    assert len(items) == 3 and str(other) not in {k[1] for k, _ in items}
    args.sources = None
    items, _ = pool_items(args, photo_teacher=False)
    assert len(items) == 4 and str(other) in {k[1] for k, _ in items}


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from facerec.teachers.compute import TeacherSpec, teach

spec = TeacherSpec("onnx", {"path": sys.argv[2]})
teacher = spec.build()
real_embed, calls = teacher.embed, [0]

def embed(images):  # the real teacher; the process is killed as it starts its third batch
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_embed(images)

teacher.embed = embed
items = [(("file", p),) * 2 for p in sys.argv[4:]]
teach(spec, items, sys.argv[3], batch_size=4, progress=False, teacher=teacher)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_process_resumes_without_recomputing(setup, reference, tmp_path):
    import subprocess

    tree, spec, teacher = setup
    ref_out, _ = reference
    out = tmp_path / "cache"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    root = Path(__file__).resolve().parents[1]
    files = [str(p) for p in sorted(tree.glob("*/*.jpg"))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(root), spec.kwargs["path"], str(out), *files],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(TeacherCache(out)) == 8  # two whole batches survived the kill
    resumed = teach(spec, items_of(tree), out, batch_size=4, progress=False, teacher=teacher)
    assert resumed.cached == 8 and resumed.computed == 4
    keys = hashes_of(tree)
    got, found = TeacherCache(out).lookup(keys)
    want, _ = TeacherCache(ref_out).lookup(keys)
    assert found.all()
    np.testing.assert_allclose(got, want, atol=1e-6)
