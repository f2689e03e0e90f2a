"""Alignment math and the ``facerec align`` command (with a fake detector; a real one if present)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facerec.cli import main as cli_main
from facerec.cli.align import AlignJob, AlignOptions, align_jobs, folder_jobs, pack_rec
from facerec.data.align import (
    ARCFACE_TEMPLATE,
    center_crop,
    ensure_three_channels,
    estimate_norm,
    norm_crop,
    template_for_size,
    umeyama,
)
from facerec.data.detect import Detection

pytestmark = pytest.mark.timeout(300)

SAMPLE = Path(__file__).parent / "data" / "lfw_sample"
LMK = np.array([[101.3, 120.9], [150.2, 115.4], [128.7, 148.1], [108.0, 172.6], [147.5, 169.2]])
# estimate_norm(LMK, 112) as computed by scikit-image 0.26 SimilarityTransform.estimate, the
# call insightface's norm_crop makes (recorded once; skimage is not a dependency).
SKIMAGE_M112 = np.array(
    [
        [0.7473681846, -0.0432962587, -32.7058823774],
        [0.0432962587, 0.7473681846, -42.151661452],
    ]
)


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array(
        [
            [scale * np.cos(a), -scale * np.sin(a), tx],
            [scale * np.sin(a), scale * np.cos(a), ty],
        ]
    )


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def closed_form_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent solve: x' = a x - b y + tx, y' = b x + a y + ty as linear least squares."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_template_values_and_sizes():
    assert ARCFACE_TEMPLATE.shape == (5, 2)
    np.testing.assert_allclose(ARCFACE_TEMPLATE[0], [38.2946, 51.6963])
    np.testing.assert_allclose(template_for_size(224), ARCFACE_TEMPLATE * 2)
    t128 = template_for_size(128)  # 128: same scale, shifted 8 px right
    np.testing.assert_allclose(t128[:, 0], ARCFACE_TEMPLATE[:, 0] + 8)
    np.testing.assert_allclose(t128[:, 1], ARCFACE_TEMPLATE[:, 1])
    np.testing.assert_allclose(template_for_size(256), (ARCFACE_TEMPLATE + [8, 0]) * 2)
    with pytest.raises(ValueError):
        template_for_size(100)


@pytest.mark.parametrize("scale,angle,tx,ty", [(2.3, 17.0, 40.0, -12.0), (0.6, -95.0, 3.0, 250.0)])
def test_recovers_known_similarity(scale, angle, tx, ty):
    forward = similarity(scale, angle, tx, ty)  # template -> image
    landmarks = apply(forward, ARCFACE_TEMPLATE)
    m = estimate_norm(landmarks)  # image -> template: the inverse
    np.testing.assert_allclose(apply(m, landmarks), ARCFACE_TEMPLATE, atol=1e-6)
    full = np.vstack([forward, [0, 0, 1]])
    np.testing.assert_allclose(m, np.linalg.inv(full)[:2], atol=1e-6)


def test_matches_closed_form_and_insightface_on_noisy_points():
    rng = np.random.default_rng(0)
    for _ in range(5):
        noisy = apply(similarity(1.7, 12, 30, 40), ARCFACE_TEMPLATE) + rng.normal(0, 2.0, (5, 2))
        np.testing.assert_allclose(
            estimate_norm(noisy),
            closed_form_similarity(noisy, ARCFACE_TEMPLATE),
            atol=1e-8,
        )
    np.testing.assert_allclose(estimate_norm(LMK), SKIMAGE_M112, atol=1e-3)
    np.testing.assert_allclose(estimate_norm(LMK), SKIMAGE_M112, atol=1e-8)


def test_reflection_gives_a_proper_rotation():
    mirrored = LMK * [-1, 1]
    m = estimate_norm(mirrored)
    assert np.linalg.det(m[:, :2]) > 0  # never a mirror image
    # general 3-D case too: a reflected cloud still yields det(R) = +1
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(10, 3))
    t = umeyama(pts, pts * [1, 1, -1])
    assert np.linalg.det(t[:3, :3]) > 0


def test_norm_crop_puts_features_on_the_template():
    face = np.zeros((112, 112, 3), np.uint8)
    for i, (x, y) in enumerate(ARCFACE_TEMPLATE):
        cv2.circle(face, (round(x), round(y)), 3, (50 * (i + 1), 255, 0), -1)
    forward = similarity(2.0, 25, 60, 10)
    big = cv2.warpAffine(face, forward, (400, 400), flags=cv2.INTER_LINEAR)
    crop = norm_crop(big, apply(forward, ARCFACE_TEMPLATE))
    assert crop.shape == (112, 112, 3)
    assert np.abs(crop.astype(int) - face.astype(int)).mean() < 2.0
    for x, y in ARCFACE_TEMPLATE:
        assert crop[round(y), round(x), 1] > 200
    assert norm_crop(big, apply(forward, ARCFACE_TEMPLATE), size=224).shape == (
        224,
        224,
        3,
    )


def test_grey_and_fallback_crop():
    grey = np.arange(200 * 150, dtype=np.uint32).reshape(200, 150).astype(np.uint8)
    rgb = ensure_three_channels(grey)
    assert rgb.shape == (200, 150, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert norm_crop(grey, LMK / 2).shape == (112, 112, 3)
    assert center_crop(grey).shape == (112, 112, 3)


class FakeDetector:
    """Places the template, scaled to the image, as the face; black images have no face and
    white ones have two (to exercise the failure policies). Judged by the centre pixel, which a
    padded retry does not change."""

    def detect(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        mean = int(image[h // 2, w // 2].mean())
        if mean < 5:
            return []
        lmk = (ARCFACE_TEMPLATE * [w / 112, h / 112]).astype(np.float32)
        face = Detection(np.array([0, 0, w, h], np.float32), 0.99, lmk)
        if mean > 250:
            small = Detection(np.array([0, 0, w / 2, h / 2], np.float32), 0.9, lmk / 2)
            return [face, small]
        return [face]


def make_tree(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    for person in sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:3]:
        (src / person.name).mkdir(parents=True)
        for f in sorted(person.glob("*.jpg"))[:2]:
            shutil.copy(f, src / person.name / f.name)
    odd = src / "Odd_Person"
    odd.mkdir()
    (odd / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cv2.imwrite(str(odd / "black.png"), np.zeros((90, 90), np.uint8))
    cv2.imwrite(str(odd / "white.png"), np.full((90, 90), 255, np.uint8))
    cv2.imwrite(str(odd / "grey.png"), np.full((120, 100), 128, np.uint8))
    return src


def test_align_jobs_report_policies_and_rerun(tmp_path):
    src = make_tree(tmp_path)
    out = tmp_path / "out"
    jobs = folder_jobs(src)
    opts = AlignOptions(policy="single", min_size=10)
    report = align_jobs(jobs, out, opts, detector=FakeDetector(), progress=False)
    c = report["counts"]
    assert (
        c["total"],
        c["aligned"],
        c["decode_error"],
        c["no_face"],
        c["many_faces"],
    ) == (10, 7, 1, 1, 1)
    assert report["failures"]["no_face"] == [str(src / "Odd_Person" / "black.png")]
    assert report["failures"]["decode_error"][0]["path"].endswith("broken.jpg")
    saved = json.loads((out / "align_report.json").read_text())
    assert saved["counts"] == c
    grey = cv2.imread(str(out / "Odd_Person" / "grey.jpg"), cv2.IMREAD_UNCHANGED)
    assert grey.shape == (112, 112, 3)

    # Rerun with the fallback: aligned files are skipped, failures become centre crops.
    opts = AlignOptions(policy="single", min_size=10, on_fail="center-crop")
    report = align_jobs(jobs, out, opts, detector=FakeDetector(), progress=False)
    c = report["counts"]
    assert (c["skipped_existing"], c["center_crop"], c["decode_error"]) == (7, 2, 1)
    assert sorted(report["center_crop"]) == ["many_faces", "no_face"]
    # A third run keeps the record of which files are fallbacks.
    report = align_jobs(jobs, out, opts, detector=FakeDetector(), progress=False)
    assert report["counts"]["skipped_existing"] == 9
    assert report["center_crop"]["no_face"] == [str(src / "Odd_Person" / "black.png")]

    # The largest policy takes the bigger of two faces instead of failing.
    report = align_jobs(
        jobs,
        tmp_path / "out2",
        AlignOptions(min_size=10),
        detector=FakeDetector(),
        progress=False,
    )
    assert report["counts"]["many_faces"] == 0 and report["counts"]["aligned"] == 8

    classes = pack_rec(out, tmp_path / "rec")
    from facerec.data.recordio import FaceRecReader

    reader = FaceRecReader(tmp_path / "rec")
    assert classes == 4 and len(reader) == 9
    image, label = reader.read(0)
    assert image.shape == (112, 112, 3) and label == 0


def test_align_jobs_process_pool(tmp_path):
    jobs = [AlignJob(str(p), p.parent.name) for p in sorted(SAMPLE.glob("*/*.jpg"))[:6]]
    report = align_jobs(
        jobs,
        tmp_path / "out",
        AlignOptions(),
        detector_factory=FakeDetector,
        workers=2,
        progress=False,
    )
    assert report["counts"]["aligned"] == 6
    assert len(list((tmp_path / "out").glob("*/*.jpg"))) == 6


def test_cli_help_and_run(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["align", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for word in (
        "--on-fail",
        "--preset",
        "center-crop",
        "align_report.json",
        "lfw__Name",
    ):
        assert word in help_text

    import facerec.cli.align as align_cli

    monkeypatch.setattr(align_cli, "make_detector", lambda *a: FakeDetector())
    src = make_tree(tmp_path)
    out = tmp_path / "rec"
    code = cli_main(
        [
            "align",
            str(src),
            "--out",
            str(out),
            "--format",
            "rec",
            "--workers",
            "0",
            "--no-progress",
            "--min-size",
            "10",
        ]
    )
    assert code == 0
    assert (out / "train.rec").exists() and (out / "property").read_text() == "4,112,112"


def _real_detector():
    try:
        from facerec.data.detect import create_detector
    except ImportError:
        pytest.skip("facerec.data.detect.create_detector is not available yet")
    try:
        return create_detector(name="mtcnn", device="cpu", backend="torch")
    except Exception as exc:  # noqa: BLE001 - missing weights on this machine
        pytest.skip(f"detector unavailable: {exc}")


@pytest.mark.slow
def test_real_detector_on_sample(tmp_path):
    detector = _real_detector()
    jobs = [AlignJob(str(p), p.parent.name) for p in sorted(SAMPLE.glob("*/*_0001.jpg"))[:10]]
    report = align_jobs(jobs, tmp_path, AlignOptions(), detector=detector, progress=False)
    assert report["counts"]["aligned"] >= 9
    # Aligned eyes sit near the template: the eye rows are darker than the cheeks below them.
    crops = np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in tmp_path.glob("*/*.jpg")])
    mean = crops.astype(float).mean(axis=0)
    assert mean[48:56, 30:82].mean() < mean[60:68, 30:82].mean()
