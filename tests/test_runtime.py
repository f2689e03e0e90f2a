"""Runtime: the strict device policy, the backends, the micro-batcher and the face pipeline."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from facerec.contract import ContractMismatchError, EmbeddingContract
from facerec.runtime import (
    BatcherClosed,
    DecodeError,
    DeviceUnavailableError,
    FacePipeline,
    FeatureListScorer,
    GpuProbe,
    MicroBatcher,
    NoFaceError,
    OnnxRuntimeBackend,
    Overloaded,
    TooManyFacesError,
    TorchBackend,
    resolve_device,
)
from facerec.runtime import device as device_mod

ort = pytest.importorskip("onnxruntime")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

SAMPLES = Path(__file__).parent / "data" / "lfw_sample"
NO_GPU = GpuProbe(False, "none", "test: no GPU")
A_GPU = GpuProbe(True, "test", "test: a GPU")
HAS_CUDA = torch.cuda.is_available()


def _sample(name: str = "Adrien_Brody/Adrien_Brody_0001.jpg") -> bytes:
    return (SAMPLES / name).read_bytes()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A small vit_tiny_fiqa (quality head + features) as ONNX and torch artefact, exported once."""
    from facerec.export import export_bundle
    from facerec.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_fiqa", depth=2)
    out = tmp_path_factory.mktemp("bundle")
    export_bundle(model, out, model_name="vit_tiny_fiqa", overrides={"depth": 2}, fp16=False, dynamo=False)
    return out / "vit_tiny_fiqa.onnx", out / "vit_tiny_fiqa.pt"


@pytest.fixture(scope="module")
def ort_backend(bundle):
    return OnnxRuntimeBackend(bundle[0], device="cpu")


@pytest.fixture(scope="module")
def detector():
    from facerec.data.detect import create_detector

    return create_detector("mtcnn", backend="onnx")


# ---------------------------------------------------------------------------------- device policy
def test_auto_without_gpu_is_cpu(monkeypatch, bundle):
    assert resolve_device("auto", probe=NO_GPU).torch_device == "cpu"
    monkeypatch.setattr(device_mod, "probe_gpu", lambda: NO_GPU)
    monkeypatch.delenv("FACEREC_DEVICE", raising=False)
    backend = OnnxRuntimeBackend(bundle[0])  # FACEREC_DEVICE unset = auto
    assert (backend.device, backend.provider) == ("cpu", "CPUExecutionProvider")
    info = backend.describe()
    assert (
        info["device_policy"]["requested"] == "auto" and info["contract_id"] == backend.contract.contract_id
    )


def test_auto_on_gpu_machine_refuses_cpu_only_onnxruntime(monkeypatch, bundle):
    monkeypatch.setattr(device_mod, "probe_gpu", lambda: A_GPU)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setenv("FACEREC_DEVICE", "auto")
    with pytest.raises(DeviceUnavailableError, match="onnxruntime-gpu"):
        OnnxRuntimeBackend(bundle[0])


def test_session_that_fell_back_to_cpu_is_refused():
    class FellBack:  # what onnxruntime does when libcudnn is missing: logs, then runs on the CPU
        def get_providers(self):
            return ["CPUExecutionProvider"]

    choice = resolve_device("auto", probe=A_GPU)
    with pytest.raises(DeviceUnavailableError, match="could not activate CUDAExecutionProvider"):
        device_mod.verify_ort_session(FellBack(), choice)
    assert (
        device_mod.verify_ort_session(FellBack(), resolve_device("cpu", probe=A_GPU))
        == "CPUExecutionProvider"
    )


def test_cuda_without_gpu_is_an_error(monkeypatch):
    with pytest.raises(DeviceUnavailableError, match="requires a GPU"):
        resolve_device("cuda", probe=NO_GPU)
    monkeypatch.setattr(device_mod, "probe_gpu", lambda: NO_GPU)
    monkeypatch.setenv("FACEREC_DEVICE", "cuda")
    with pytest.raises(DeviceUnavailableError):
        resolve_device()
    monkeypatch.setenv("FACEREC_DEVICE", "gpu please")
    with pytest.raises(ValueError, match="auto, cuda, cuda:N or cpu"):
        resolve_device()
    assert resolve_device("cpu", probe=A_GPU).torch_device == "cpu"  # the CPU on purpose
    assert resolve_device("cuda:1", probe=A_GPU).torch_device == "cuda:1"


@pytest.mark.skipif(HAS_CUDA, reason="torch can use the GPU here")
def test_torch_backend_refuses_a_gpu_it_cannot_use(bundle):
    with pytest.raises(DeviceUnavailableError, match="CUDA build of torch"):
        TorchBackend(bundle[1], device=resolve_device("auto", probe=A_GPU))


def test_gpu_probe_rules(monkeypatch):
    monkeypatch.setattr(device_mod, "_torch_cuda", lambda: (False, "cpu torch"))
    monkeypatch.setattr(device_mod, "_dev_nodes", list)
    monkeypatch.setattr(device_mod, "_nvidia_smi", list)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert not device_mod.probe_gpu().present
    monkeypatch.setattr(device_mod, "_nvidia_smi", lambda: ["GPU 0: NVIDIA H100 (UUID: x)"])
    assert device_mod.probe_gpu().source == "nvidia-smi"
    monkeypatch.setattr(device_mod, "_dev_nodes", lambda: ["/dev/nvidia0"])
    assert device_mod.probe_gpu().source == "/dev/nvidia*"  # a GPU even though torch is a CPU build
    monkeypatch.setattr(device_mod, "_torch_cuda", lambda: (True, "torch sees 1 GPU"))
    assert device_mod.probe_gpu().source == "torch"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # hidden on purpose wins over everything
    assert not device_mod.probe_gpu().present


# ---------------------------------------------------------------------------------- backends
def test_onnxruntime_and_torch_backends_agree(bundle, ort_backend):
    torch_backend = TorchBackend(bundle[1], device="cpu", compile="eager")  # the compile path, cheaply
    assert torch_backend.contract.contract_id == ort_backend.contract.contract_id
    assert torch_backend.output_names == ort_backend.output_names
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    a, b = ort_backend.run(crops), torch_backend.run(crops)
    cos = (
        (a["embedding"] * b["embedding"]).sum(1)
        / np.linalg.norm(a["embedding"], axis=1)
        / np.linalg.norm(b["embedding"], axis=1)
    )
    assert cos.min() >= 0.9999 and a["quality"].shape == (3,)
    normalised = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ort_backend.run(normalised)["embedding"], a["embedding"], rtol=1e-5, atol=1e-5)
    assert ort_backend.run(crops[0])["embedding"].shape == (1, 512)  # one crop = a batch of one
    with pytest.raises(ValueError, match="RGB"):
        ort_backend.run(np.zeros((1, 100, 100, 3), np.uint8))
    with pytest.raises(ValueError, match="amp"):
        TorchBackend(bundle[1], device="cpu", amp="fp16")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_torch_backend_on_gpu_with_autocast(bundle, monkeypatch):
    monkeypatch.delenv("FACEREC_DEVICE", raising=False)
    gpu = TorchBackend(bundle[1], amp="fp16")  # auto -> the GPU
    cpu = TorchBackend(bundle[1], device="cpu")
    assert gpu.device.startswith("cuda") and gpu.describe()["gpu_name"]
    crops = np.random.default_rng(1).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    a, b = gpu.run(crops)["embedding"], cpu.run(crops)["embedding"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DeviceUnavailableError):  # auto on this GPU machine: strict
            OnnxRuntimeBackend(bundle[0])


# ---------------------------------------------------------------------------------- micro-batcher
class GateBackend:
    """Records batch sizes; its first call blocks until ``release`` is set; echoes each face's value."""

    def __init__(self, fail: bool = False) -> None:
        self.contract = EmbeddingContract("fake", "1", 4, 8)
        self.output_names = ["embedding"]
        self.device, self.provider = "cpu", "fake"
        self.sizes: list[int] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.fail = fail

    def run(self, batch):
        self.sizes.append(len(batch))
        if len(self.sizes) == 1:
            self.started.set()
            assert self.release.wait(30), "the test never released the backend"
        if self.fail:
            raise RuntimeError("boom")
        return {"embedding": batch.reshape(len(batch), -1)[:, :4].astype(np.float32)}


def _face(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


async def _until_running(backend: GateBackend) -> None:
    await asyncio.get_running_loop().run_in_executor(None, backend.started.wait, 30)


def test_concurrent_requests_are_batched_together():
    async def scenario():
        backend = GateBackend()
        async with MicroBatcher(backend, max_batch_size=8, max_wait_ms=5) as batcher:
            first = batcher.submit(_face(0))
            await _until_running(backend)  # the backend is busy with batch 1 ...
            waiting = [batcher.submit(_face(v)) for v in range(1, 7)]  # ... while six more queue up
            assert batcher.queued == 6 and batcher.pending == 7
            backend.release.set()
            results = await asyncio.gather(first, *waiting)
        assert backend.sizes == [1, 6]
        for value, result in enumerate(results):  # every caller got its own face's row back
            assert result["embedding"].shape == (1, 4) and np.all(result["embedding"] == value)
        assert batcher.pending == 0

    asyncio.run(scenario())


def test_simultaneous_requests_share_one_batch_and_multi_face_requests():
    async def scenario():
        backend = GateBackend()
        backend.release.set()
        seen = []
        async with MicroBatcher(
            backend, max_batch_size=6, max_wait_ms=10_000, on_batch=seen.append
        ) as batcher:
            pair = np.stack([_face(7), _face(8)])
            results = await asyncio.gather(*(batcher.run(_face(v)) for v in range(4)), batcher.run(pair))
        assert backend.sizes == [6]  # full batch: ran without waiting out the 10 s
        assert seen[0].size == 6 and seen[0].requests == 5 and len(seen[0].queue_wait_s) == 6
        assert results[4]["embedding"][:, 0].tolist() == [7, 8]

    asyncio.run(scenario())


def test_queue_limit_raises_overloaded():
    async def scenario():
        backend = GateBackend()
        batcher = MicroBatcher(backend, max_batch_size=2, max_wait_ms=0, max_pending=3)
        first = batcher.submit(_face(0))
        await _until_running(backend)
        admitted = [batcher.submit(_face(1)), batcher.submit(_face(2))]
        with pytest.raises(Overloaded) as info:
            batcher.submit(_face(3))
        assert info.value.retry_after_s > 0 and info.value.limit == 3 and info.value.pending == 3
        with pytest.raises(ValueError, match="exceeds"):
            batcher.submit(np.stack([_face(1)] * 4))
        backend.release.set()
        await asyncio.gather(first, *admitted)
        await asyncio.sleep(0)  # let the futures' done-callbacks release their slots
        assert batcher.pending == 0
        assert (await batcher.run(_face(4)))["embedding"][0, 0] == 4  # admitted again
        await batcher.close()
        with pytest.raises(BatcherClosed):
            batcher.submit(_face(5))

    asyncio.run(scenario())


def test_backend_error_reaches_every_caller_of_the_batch():
    async def scenario():
        backend = GateBackend(fail=True)
        batcher = MicroBatcher(backend, max_batch_size=8, max_wait_ms=5)
        first = batcher.submit(_face(0))
        await _until_running(backend)
        waiting = [batcher.submit(_face(v)) for v in range(1, 6)]
        backend.release.set()
        results = await asyncio.gather(first, *waiting, return_exceptions=True)
        assert backend.sizes == [1, 5]
        assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)
        backend.fail = False  # the batcher survives a failed batch
        assert (await batcher.run(_face(9)))["embedding"][0, 0] == 9
        await batcher.close()

    asyncio.run(scenario())


def test_close_without_drain_fails_queued_requests():
    async def scenario():
        backend = GateBackend()
        batcher = MicroBatcher(backend, max_batch_size=1, max_wait_ms=0)
        running = batcher.submit(_face(0))
        await _until_running(backend)
        queued = [batcher.submit(_face(1)), batcher.submit(_face(2))]
        closing = asyncio.ensure_future(batcher.close(drain=False))
        done, _ = await asyncio.wait(queued)
        assert all(isinstance(f.exception(), BatcherClosed) for f in done)
        backend.release.set()
        await closing
        assert (await running)["embedding"][0, 0] == 0  # the running batch still finished
        assert backend.sizes == [1]

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------- pipeline
def test_pipeline_on_a_sample_photo(ort_backend, detector):
    pipeline = FacePipeline(ort_backend, detector=detector, keep_crops=True)
    result = pipeline.process(_sample())
    assert result.faces_found == 1 and len(result.faces) == 1 and (result.width, result.height) == (250, 250)
    face = result.faces[0]
    assert abs(np.linalg.norm(face.embedding) - 1.0) < 1e-5 and face.embedding_norm > 0
    assert face.embedding.shape == (512,) and face.quality is not None and face.det_score > 0.9
    assert face.box.shape == (4,) and face.landmarks.shape == (5, 2) and face.crop.shape == (112, 112, 3)
    assert 0 < face.box[0] < face.landmarks[0, 0] < face.box[2]  # the left eye inside the box
    direct = ort_backend.run(face.crop)["embedding"][0]
    assert np.allclose(face.embedding, direct / np.linalg.norm(direct), atol=1e-6)


def test_pipeline_typed_errors(ort_backend, detector):
    pipeline = FacePipeline(ort_backend, detector=detector, max_faces=1)
    with pytest.raises(DecodeError) as info:
        pipeline.process(b"this is not an image")
    assert info.value.code == "decode_error"
    with pytest.raises(NoFaceError):
        pipeline.process(np.full((160, 160, 3), 128, np.uint8))
    with pytest.raises(TypeError, match="not a str"):
        pipeline.process(str(SAMPLES / "Adrien_Brody" / "Adrien_Brody_0001.jpg"))
    from facerec.data.image_io import load_image

    left = load_image(_sample())
    right = load_image(_sample("Al_Sharpton/" + min(p.name for p in (SAMPLES / "Al_Sharpton").iterdir())))
    two = np.ascontiguousarray(np.concatenate([left, right], axis=1))
    with pytest.raises(TooManyFacesError) as many:
        pipeline.process(two)
    assert many.value.code == "too_many_faces" and many.value.found == 2
    both = FacePipeline(ort_backend, detector=detector, max_faces=5).process(two, all_faces=True)
    assert both.faces_found == 2 and len(both.faces) == 2
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in both.faces]
    assert areas[0] >= areas[1]  # largest first


def test_pipeline_async_through_batcher_with_ood_scorer(ort_backend, detector):
    calls, seen_det = [], []

    def ood(outputs):
        calls.append(sorted(outputs))
        seen_det.append(outputs["det_score"].copy())
        return [float(v.sum()) for v in outputs["feature_1"]]

    async def scenario():
        async with MicroBatcher(ort_backend, max_batch_size=4, max_wait_ms=20) as batcher:
            pipeline = FacePipeline(ort_backend, detector=detector, batcher=batcher, ood_scorer=ood)
            return await asyncio.gather(*(pipeline.process_async(_sample()) for _ in range(3)))

    results = asyncio.run(scenario())
    reference = FacePipeline(ort_backend, detector=detector).process(_sample())
    for r in results:
        assert np.allclose(r.faces[0].embedding, reference.faces[0].embedding, atol=1e-5)
        assert isinstance(r.faces[0].ood, float)
    # the scorer sees the embedding, every exported feature output (whatever the model taps) and
    # the face detector's confidence of each face
    features = [n for n in ort_backend.output_names if n.startswith("feature_")]
    assert len(features) >= 2 and calls[0] == sorted(["det_score", "embedding", *features])
    np.testing.assert_array_equal(seen_det[0], [f.det_score for f in reference.faces])

    class OtherModelsStatistics:
        contract_id = "0123456789abcdef"

        def __call__(self, outputs):
            return [0.0] * len(outputs["embedding"])

    with pytest.raises(ContractMismatchError):
        FacePipeline(ort_backend, detector=detector, ood_scorer=OtherModelsStatistics())

    n_features = len(features)

    class LayerListDetector:  # the shape of facerec.ood's MahalanobisDetector: score(list of layers)
        contract_id = ort_backend.contract.contract_id

        def score(self, features):
            dims = [f.shape[1] for f in features]  # token taps (192) then any pixel-statistics tap
            assert len(dims) == n_features and dims[:2] == [192, 192]
            return -np.stack([f.mean(1) for f in features], 1).sum(1)

    scorer = FeatureListScorer(LayerListDetector())
    face = FacePipeline(ort_backend, detector=detector, ood_scorer=scorer).process(_sample()).faces[0]
    assert np.isfinite(face.ood)
