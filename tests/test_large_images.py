"""Large legal images cost bounded work and cannot starve small ones (issue 16, item 2): the detector
sees a bounded copy, boxes and landmarks come back in full-resolution pixels, crops come from the
resolution that holds the face, and large images run in their own admission lane."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

import facerec.data.image_io as image_io
from facerec.runtime import FacePipeline, load_backend
from facerec.runtime.admission import ImageAdmission, LargeImagesOverloaded
from facerec.runtime.pipeline import DETECT_MAX_SIDE, aligned_crop
from service.testing import SAMPLES

FACE = SAMPLES / "Adrien_Brody/Adrien_Brody_0001.jpg"
_FOLDER = SAMPLES.parents[2] / "models" / "default"
MODEL = next(iter(sorted(_FOLDER.glob("*.onnx"))), _FOLDER / "missing.onnx")  # the shipped graph


class RecordingDetector:
    """The real detector, recording the size of every image it is given."""

    def __init__(self, detector) -> None:
        self.detector = detector
        self.name = getattr(detector, "name", "mtcnn")
        self.shapes: list[tuple[int, ...]] = []

    def detect(self, image):
        self.shapes.append(image.shape)
        return self.detector.detect(image)


@pytest.fixture(scope="module")
def pipeline():
    if not MODEL.exists():
        pytest.skip("the shipped model is not in this checkout")
    from facerec.data.detect import create_detector

    backend = load_backend(MODEL, device="cpu")
    return FacePipeline(backend, detector=RecordingDetector(create_detector("mtcnn", backend="onnx")),
                        max_pixels=40_000_000)


def _encode(bgr: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, bgr, [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else [])
    assert ok
    return buf.tobytes()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("side,ext", [(6000, ".jpg"), (4000, ".png")])
def test_a_huge_photo_is_detected_on_a_bounded_copy_and_mapped_back(pipeline, side, ext):
    ref = pipeline.process(FACE.read_bytes()).faces[0]
    big = cv2.resize(cv2.imread(str(FACE)), (side, side), interpolation=cv2.INTER_CUBIC)
    data = _encode(big, ext)
    del big
    pipeline.detector.shapes.clear()
    start = time.perf_counter()
    result = pipeline.process(data)
    elapsed = time.perf_counter() - start
    assert elapsed < 30.0  # ~1-3 s; the whole image through MTCNN took 9 s (6000 px) on a fast CPU
    assert max(max(s[:2]) for s in pipeline.detector.shapes) <= DETECT_MAX_SIDE
    assert (result.width, result.height) == (side, side)
    face = result.faces[0]
    f = side / 250.0
    size = ref.box[2] - ref.box[0]
    # Full-resolution coordinates: scaled back they agree with the face found at 250 px.
    assert np.abs(face.box / f - ref.box).max() < 0.08 * size
    assert np.abs(face.landmarks / f - ref.landmarks).max() < 0.05 * size
    assert float(face.embedding @ ref.embedding) > 0.9  # the same face to the model


@pytest.mark.timeout(120)
def test_jpeg_is_decoded_reduced_and_at_full_resolution_only_for_a_small_face(pipeline, monkeypatch):
    calls: list[int] = []
    real = image_io.load_image

    def spy(data, *args, reduce=1, **kw):
        calls.append(reduce)
        return real(data, *args, reduce=reduce, **kw)

    monkeypatch.setattr(image_io, "load_image", spy)
    face = cv2.imread(str(FACE))
    # The face fills the photo: a 1/2 decode holds it at more than the crop's resolution.
    pipeline.process(_encode(cv2.resize(face, (6000, 6000), interpolation=cv2.INTER_CUBIC)))
    assert calls == [2]
    # A 375-pixel face photo in a 6000-pixel frame: too small in the 1/2 decode, cropped from the full one.
    calls.clear()
    canvas = np.full((6000, 6000, 3), 200, np.uint8)
    canvas[2800:3175, 2800:3175] = cv2.resize(face, (375, 375), interpolation=cv2.INTER_CUBIC)
    result = pipeline.process(_encode(canvas))
    assert calls == [2, 1]
    box = result.faces[0].box
    assert 2800 < box[0] < box[2] < 3175 and 2800 < box[1] < box[3] < 3175


@pytest.mark.timeout(120)
def test_exif_rotation_of_a_reduced_jpeg_keeps_full_resolution_coordinates(pipeline):
    import io

    from PIL import Image

    upright = np.full((6000, 4500, 3), 128, np.uint8)  # portrait: 4500 wide, 6000 high
    rgb = cv2.imread(str(FACE))[:, :, ::-1]
    upright[:4500] = cv2.resize(rgb, (4500, 4500), interpolation=cv2.INTER_CUBIC)
    expected = pipeline.process(_encode(upright[:, :, ::-1])).faces[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise: "rotate 90 clockwise to view"
    out = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(out, "JPEG", quality=90,
                                                                        exif=exif.tobytes())
    result = pipeline.process(out.getvalue())
    assert (result.width, result.height) == (4500, 6000)
    assert np.abs(result.faces[0].box - expected.box).max() < 0.02 * (expected.box[2] - expected.box[0])


def test_aligned_crop_shrinks_a_large_face_before_warping():
    """A face 16x larger than the crop, with pixel-level detail (sensor noise, pores): the crop is
    close to the one made from the face at crop scale; a plain bilinear warp samples every 16th
    pixel, keeps the noise and is not."""
    from facerec.data.align import norm_crop

    rng = np.random.default_rng(0)
    small = cv2.GaussianBlur(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8), (0, 0), 2.0)
    landmarks = np.array([[60, 70], [100, 70], [80, 92], [64, 116], [96, 116]], np.float32)
    big = cv2.resize(small, (2560, 2560), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    big = np.clip(big + rng.integers(-60, 61, big.shape), 0, 255).astype(np.uint8)
    on_big = (landmarks + 0.5) * 16 - 0.5  # the same points, pixel centres of the 16x image
    reference = norm_crop(small, landmarks, 112).astype(int)
    anti_aliased = np.abs(aligned_crop(big, on_big, 112).astype(int) - reference).mean()
    plain = np.abs(norm_crop(big, on_big, 112).astype(int) - reference).mean()
    assert anti_aliased < 0.5 * plain, (anti_aliased, plain)


# --------------------------------------------------------------------------- admission lanes
def test_small_images_pass_while_large_ones_hold_their_lane():
    """Eight large images block in their lane (on an event, not a sleep); a small image is served
    meanwhile, and the lane refuses more than it may queue, at once."""
    small_pool = ThreadPoolExecutor(2)
    admission = ImageAdmission(small_pool, large_pixels=1_000_000, large_workers=2, max_queued=6)
    large = np.zeros((2000, 2000, 3), np.uint8)  # 4 MP: large
    small = np.zeros((100, 100, 3), np.uint8)
    release = threading.Event()
    started = threading.Semaphore(0)

    def heavy():
        started.release()
        release.wait(30)
        return "large"

    async def run(data, fn):
        async with admission.admit(data) as executor:
            return await asyncio.get_running_loop().run_in_executor(executor, fn)

    async def scenario():
        loop = asyncio.get_running_loop()
        big = [asyncio.create_task(run(large, heavy)) for _ in range(8)]
        for _ in range(2):  # both large threads are busy (and 6 images wait behind them)
            await loop.run_in_executor(None, started.acquire)
        assert admission.large_inflight == 8
        # A ninth large image is refused at once, with a Retry-After estimate.
        with pytest.raises(LargeImagesOverloaded, match="8 of 8 images over 1000000 pixels"):
            async with admission.admit(large):
                pass
        # The small image does not queue behind them: it is answered while they are all held.
        assert await asyncio.wait_for(run(small, lambda: "small"), timeout=20) == "small"
        assert not any(t.done() for t in big)
        release.set()
        return await asyncio.gather(*big)

    try:
        assert asyncio.run(scenario()) == ["large"] * 8
        assert admission.large_inflight == 0
    finally:
        release.set()
        admission.shutdown()
        small_pool.shutdown()


def test_image_size_is_read_from_the_header_for_admission():
    admission = ImageAdmission(None, large_pixels=1_000_000, large_workers=1, max_queued=0)
    try:
        assert admission.is_large(_encode(np.zeros((1001, 1000, 3), np.uint8), ".png"))
        assert not admission.is_large(_encode(np.zeros((1000, 1000, 3), np.uint8), ".png"))
        assert not admission.is_large(b"not an image")  # the pipeline refuses it, in the small lane
    finally:
        admission.shutdown()


def test_the_engine_sends_each_image_through_its_lane():
    from service.engine import Engine
    from service.settings import Settings

    class Pipeline:
        executors: list = []

        async def locate_async(self, data, all_faces=False, executor=None, index=None, aligned=False):
            self.executors.append(executor)
            return data

        async def embed_async(self, located):
            return list(located)

    engine = Engine(Settings(api_keys=["engine-key-0123456789abcdef"], large_image_pixels=1_000_000))
    small_pool = ThreadPoolExecutor(1)
    engine.pipeline = Pipeline()
    engine.images = ImageAdmission(small_pool, 1_000_000, 1, 4)
    try:
        big = _encode(np.zeros((1200, 1000, 3), np.uint8), ".png")
        little = _encode(np.zeros((100, 100, 3), np.uint8), ".png")

        async def both():
            return await engine.process(big), await engine.process(little)

        asyncio.run(both())
        assert engine.pipeline.executors == [engine.images.large_executor, small_pool]
    finally:
        engine.images.shutdown()
        small_pool.shutdown()


def _exif_orientation_app1(orientation: int) -> bytes:
    """An APP1 segment holding a big-endian EXIF IFD0 with one Orientation (0x0112) entry."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


@pytest.mark.parametrize("orientation", [None, 1, 6, 8])
def test_full_size_after_a_reduced_decode_of_a_near_square_jpeg(orientation):
    """199 wide x 200 high at 1/2: ceil gives 100x100 either way, so the shape cannot say whether
    EXIF turned it; the EXIF tag must (a guess from the shape swapped a plain 199x200)."""
    from facerec.data.image_headers import jpeg_orientation
    from facerec.runtime.pipeline import _decode

    rng = np.random.default_rng(0)
    data = _encode(rng.integers(0, 255, (200, 199, 3), dtype=np.uint8))
    if orientation is not None:
        data = data[:2] + _exif_orientation_app1(orientation) + data[2:]
        assert jpeg_orientation(data) == orientation
    decoded = _decode(data, None, None, max_side=100)
    assert decoded.image.shape[:2] == (100, 100)  # it was decoded reduced
    full = decoded.full().shape[:2]  # what OpenCV itself makes of the orientation
    turned = orientation in (6, 8)
    assert full == ((199, 200) if turned else (200, 199))
    assert decoded.shape == full


def test_full_size_after_a_reduced_decode_follows_the_shape_when_it_is_unambiguous():
    from facerec.runtime.pipeline import _decode

    data = _encode(np.zeros((200, 150, 3), np.uint8))
    for orientation, reduced, expected in [(None, (50, 38), (200, 150)), (6, (38, 50), (150, 200))]:
        jpeg = data if orientation is None else data[:2] + _exif_orientation_app1(orientation) + data[2:]
        decoded = _decode(jpeg, None, None, max_side=50)  # at 1/4: ceil(150 / 4) = 38
        assert decoded.image.shape[:2] == reduced
        assert decoded.shape == expected == decoded.full().shape[:2]


def test_decode_reads_the_header_once(monkeypatch):
    from facerec.runtime.pipeline import _decode

    calls = []
    real = image_io.read_header
    monkeypatch.setattr(image_io, "read_header", lambda data: calls.append(1) or real(data))
    decoded = _decode(_encode(np.zeros((400, 300, 3), np.uint8)), None, None, max_side=100)
    assert decoded.image.shape[:2] == (100, 75) and decoded.full().shape[:2] == (400, 300)
    assert len(calls) == 1  # not again in load_image, for the reduced nor the full decode
