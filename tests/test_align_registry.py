"""The alignment registry: a contract's alignment id says how its crops are cut from a photo."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facerec.contract import ARCFACE_TEMPLATE_112, DLIB_CHIP_150, ContractMismatchError, EmbeddingContract
from facerec.data.align import (
    ALIGNMENTS,
    ARCFACE_TEMPLATE,
    DLIB_CHIP_TEMPLATE_150,
    UnknownAlignmentError,
    alignment_template,
    estimate_norm,
    get_alignment,
    norm_crop,
    template_for_size,
    umeyama,
)
from facerec.runtime.imaging import aligned_crop


def test_the_registry_holds_arcface_and_dlibs_chip():
    assert set(ALIGNMENTS) >= {ARCFACE_TEMPLATE_112, DLIB_CHIP_150}
    assert (get_alignment(ARCFACE_TEMPLATE_112).size, get_alignment(DLIB_CHIP_150).size) == (112, 150)
    assert np.array_equal(alignment_template(DLIB_CHIP_150), DLIB_CHIP_TEMPLATE_150)
    with pytest.raises(ValueError, match="150x150"):
        alignment_template(DLIB_CHIP_150, 112)


def test_an_unknown_alignment_is_one_clear_error():
    for unknown in ("center-crop-150", "arcface-5pt-112-v2"):
        with pytest.raises(UnknownAlignmentError, match=f"unknown alignment '{unknown}'.*{DLIB_CHIP_150}"):
            estimate_norm(np.zeros((5, 2)) + np.arange(5)[:, None], 112, unknown)


def test_arcface_is_unchanged_bit_for_bit():
    """The default and the explicit ArcFace id give what the template rule and a plain warp give."""
    for size in (112, 128, 224):
        assert np.array_equal(alignment_template(ARCFACE_TEMPLATE_112, size), template_for_size(size))
    assert np.array_equal(alignment_template(), ARCFACE_TEMPLATE)
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (240, 200, 3), dtype=np.uint8)
    landmarks = ARCFACE_TEMPLATE * 1.3 + [30.0, 40.0] + rng.normal(0, 1.5, (5, 2))
    for size in (112, 128):
        matrix = umeyama(landmarks, template_for_size(size))[:2]
        plain = cv2.warpAffine(photo, matrix, (size, size), borderValue=0.0)
        assert np.array_equal(norm_crop(photo, landmarks, size), plain)
        assert np.array_equal(norm_crop(photo, landmarks, size, ARCFACE_TEMPLATE_112), plain)
        assert np.array_equal(aligned_crop(photo, landmarks, size), aligned_crop(photo, landmarks, size,
                                                                                ARCFACE_TEMPLATE_112))


def _blob_photo(points: np.ndarray, sigma: float, shape=(700, 640)) -> np.ndarray:
    """A grey photo with a Gaussian spot (peak 255 over 20) centred on each point."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    img = np.full(shape, 20.0)
    for x, y in points:
        img += 235.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(img, 0, 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def _spot_centres(crop: np.ndarray, near: np.ndarray, radius: int = 9) -> np.ndarray:
    """The intensity-weighted centre of the spot around each expected point (background removed)."""
    grey = crop[:, :, 0].astype(np.float64) - 20.0
    out = []
    for x, y in near:
        x0, y0 = int(round(x)) - radius, int(round(y)) - radius
        win = np.clip(grey[y0:y0 + 2 * radius + 1, x0:x0 + 2 * radius + 1], 0, None)
        yy, xx = np.mgrid[0:win.shape[0], 0:win.shape[1]]
        out.append([x0 + (win * xx).sum() / win.sum(), y0 + (win * yy).sum() / win.sum()])
    return np.array(out)


@pytest.mark.parametrize("scale", [1.6, 3.5])  # 3.5: the face is shrunk before the warp (anti-aliasing)
def test_a_photo_is_cut_so_its_landmarks_land_on_dlibs_template(scale):
    angle = np.radians(12.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (DLIB_CHIP_TEMPLATE_150 - 75.0) @ (scale * rot).T + [320.0, 350.0]
    photo = _blob_photo(landmarks, sigma=2.0 * scale)
    crop = aligned_crop(photo, landmarks, 150, DLIB_CHIP_150)
    assert crop.shape == (150, 150, 3)
    found = _spot_centres(crop, DLIB_CHIP_TEMPLATE_150)
    assert np.abs(found - DLIB_CHIP_TEMPLATE_150).max() < 0.5, found - DLIB_CHIP_TEMPLATE_150


class _Model:
    output_names: tuple = ()

    def __init__(self, contract):
        self.contract = contract


def test_the_pipeline_takes_a_dlib_contract_and_refuses_a_wrong_size():
    from facerec.runtime import FacePipeline

    dlib = EmbeddingContract("dlib", "1", 128, input_size=150, alignment=DLIB_CHIP_150)
    pipeline = FacePipeline(_Model(dlib), detector=object())
    chip = np.zeros((150, 150, 3), np.uint8)
    located = pipeline.locate_aligned(chip)
    assert np.allclose(located.detections[0].landmarks, DLIB_CHIP_TEMPLATE_150, atol=1e-4)
    with pytest.raises(ContractMismatchError, match="input size"):
        FacePipeline(_Model(EmbeddingContract("dlib", "1", 128, input_size=112, alignment=DLIB_CHIP_150)))


def test_facerec_align_cuts_to_the_chosen_alignment():
    from facerec.cli.align import AlignOptions, align_image
    from facerec.data.detection import Detection

    scale = 1.6
    landmarks = (DLIB_CHIP_TEMPLATE_150 - 75.0) * scale + [320.0, 350.0]
    photo = _blob_photo(landmarks, sigma=2.0 * scale)

    class Detector:  # what MTCNN would say: one face with these landmarks
        def detect(self, image):
            return [Detection(np.array([200, 230, 440, 470], np.float32), 0.99, landmarks.astype(np.float32))]

    opts = AlignOptions(size=150, alignment=DLIB_CHIP_150)
    crop, status = align_image(Detector(), photo, opts)
    assert status == "ok" and crop.shape == (150, 150, 3)
    assert np.abs(_spot_centres(crop, DLIB_CHIP_TEMPLATE_150) - DLIB_CHIP_TEMPLATE_150).max() < 0.5


def test_a_tree_cut_for_another_alignment_is_refused_in_one_line(tmp_path):
    from facerec.cli.eval_data import require_crop_size

    dlib = EmbeddingContract("dlib", "1", 128, input_size=150, alignment=DLIB_CHIP_150)
    crop = tmp_path / "a.jpg"
    cv2.imwrite(str(crop), np.zeros((112, 112, 3), np.uint8))
    with pytest.raises(SystemExit, match=f"112x112, the model takes 150x150 crops on alignment {DLIB_CHIP_150}"):
        require_crop_size(dlib, crop, "--images t")
    require_crop_size(dlib, np.zeros((150, 150, 3), np.uint8), "--images t")  # the model's crop: fine
