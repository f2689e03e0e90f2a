"""Image damage for quality training (facerec/data/degrade.py): each kind checked against a direct
re-derivation or an invariant, the random mix against its stated probabilities, and the trainer's
config and transform wiring."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from facerec.data import degrade as D
from facerec.data.datasets import TrainTransform
from facerec.data.image_io import load_image

SAMPLE = sorted((Path(__file__).parent / "data" / "lfw_sample").glob("*/*.jpg"))


def face_crop(i: int = 0) -> np.ndarray:
    """A 112x112 face: the centre 150 px of a deep-funneled LFW sample photo, resized."""
    photo = load_image(SAMPLE[i])
    return cv2.resize(photo[50:200, 50:200], (112, 112), interpolation=cv2.INTER_AREA)


def laplacian_variance(image: np.ndarray) -> float:
    grey = image.astype(np.float64).mean(axis=2)
    lap = -4 * grey[1:-1, 1:-1] + grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]
    return float(lap.var())


def test_blur_of_a_point_is_the_gaussian_kernel():
    image = np.zeros((41, 41, 3), np.uint8)
    image[20, 20] = 255
    sigma = 2.0
    out = D.gaussian_blur(image, sigma).astype(np.float64)
    y, x = np.mgrid[-20:21, -20:21]
    kernel_1d = np.exp(-np.arange(-6, 7) ** 2 / (2 * sigma**2))
    norm = kernel_1d.sum() ** 2  # the sampled, truncated, normalised separable kernel
    expected = 255 * np.exp(-(x**2 + y**2) / (2 * sigma**2)) / norm
    expected[(np.abs(x) > 6) | (np.abs(y) > 6)] = 0
    assert np.abs(out[..., 0] - expected).max() <= 1.0  # uint8 rounding
    assert np.array_equal(out[..., 0], out[..., 2])
    assert np.array_equal(D.gaussian_blur(image, 0.0), image)
    flat = np.full((30, 30, 3), 77, np.uint8)
    assert np.array_equal(D.gaussian_blur(flat, 3.0), flat)


def test_resample_removes_detail_finer_than_the_new_size():
    checker = (np.indices((112, 112)).sum(axis=0) % 2 * 255).astype(np.uint8)
    checker = np.repeat(checker[:, :, None], 3, axis=2)
    out = D.resample(checker, 56)
    assert out.shape == checker.shape
    assert np.abs(out.astype(int) - 127.5).max() <= 1  # period 2 px averages to mid-grey
    face = face_crop()
    assert np.array_equal(D.resample(face, 112), face)
    assert laplacian_variance(D.resample(face, 40)) < 0.3 * laplacian_variance(face)


def test_jpeg_error_grows_as_quality_falls():
    face = face_crop()
    err = {q: np.abs(D.jpeg(face, q).astype(int) - face).mean() for q in (100, 50, 10)}
    assert err[100] < 2.0 < err[10] and err[100] < err[50] < err[10]
    with pytest.raises(ValueError, match="quality"):
        D.jpeg(face, 0)


def test_noise_has_the_stated_sigma_and_follows_the_seed():
    grey = np.full((200, 200, 3), 128, np.uint8)
    out = D.gaussian_noise(grey, 10.0, np.random.default_rng(0)).astype(np.float64) - 128
    assert abs(out.std() - 10.0) < 0.3 and abs(out.mean()) < 0.2
    a = D.gaussian_noise(grey, 5.0, np.random.default_rng(3))
    assert np.array_equal(a, D.gaussian_noise(grey, 5.0, np.random.default_rng(3)))
    assert not np.array_equal(a, D.gaussian_noise(grey, 5.0, np.random.default_rng(4)))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
def test_occlusion_covers_the_stated_fraction_with_one_rectangle(fraction):
    white = np.full((112, 112, 3), 255, np.uint8)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out = D.occlude(white, fraction, rng)
        changed = (out != 255).any(axis=2)
        ys, xs = np.nonzero(changed)
        # Every pixel of the bounding box is covered (a flat colour may leave a channel at 255).
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert abs(box - fraction * 112 * 112) <= 2 * 112  # rounding of one side
        assert changed.sum() <= box
    assert np.array_equal(D.occlude(white, 0.0, np.random.default_rng(0)), white)


def test_low_light_is_the_stated_curve():
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    out = D.low_light(ramp, 0.5, 2.0)[0, :, 0].astype(np.float64)
    expected = 255 * (0.5 * np.arange(256) / 255) ** 2
    assert np.abs(out - expected).max() <= 0.5
    assert np.all(np.diff(out) >= 0)
    assert np.array_equal(D.low_light(ramp, 1.0, 1.0), ramp)


def test_the_recipe_damages_and_scales_with_the_image():
    face = face_crop()
    damaged = D.DamageRecipe()(face)
    assert damaged.shape == face.shape and damaged.dtype == np.uint8
    # JPEG-10 block edges add some high frequencies back: far less detail all the same.
    assert laplacian_variance(damaged) < 0.5 * laplacian_variance(face)
    assert np.abs(damaged.astype(int) - face).mean() > 5
    # The same face at twice the size gets the same damage relative to the face: shrunk back to
    # 112, it is close to the recipe applied at 112 (much closer than to the clean face).
    big = cv2.resize(face, (224, 224), interpolation=cv2.INTER_CUBIC)
    big_damaged = cv2.resize(D.DamageRecipe()(big), (112, 112), interpolation=cv2.INTER_AREA)
    d_same = np.abs(big_damaged.astype(int) - damaged).mean()
    d_clean = np.abs(big_damaged.astype(int) - face).mean()
    assert d_same < 0.6 * d_clean


def test_random_degradation_follows_its_probabilities():
    deg = D.RandomDegradation()
    rng = np.random.default_rng(0)
    n = 4000
    draws = [deg.choose(rng) for _ in range(n)]
    degraded = sum(bool(d) for d in draws)
    assert abs(degraded / n - deg.p) < 0.03  # binomial sd ~0.008
    kinds = dict(deg.kinds())
    none_on = math.prod(1 - p for p in kinds.values())
    total = sum(kinds.values())
    for name, prob in kinds.items():
        # P(kind | degraded) = its own probability, plus its share of the forced pick when none fired.
        expected = prob + none_on * prob / total
        seen = sum(name in d for d in draws) / max(degraded, 1)
        assert abs(seen - expected) < 0.05, (name, seen, expected)
    assert all(list(d) == [k for k in kinds if k in d] for d in draws)  # the fixed order
    face = face_crop()
    assert np.array_equal(D.RandomDegradation(p=0.0)(face, np.random.default_rng(0)), face)
    a = deg(face, np.random.default_rng(9))
    assert np.array_equal(a, deg(face, np.random.default_rng(9)))


def test_random_degradation_refuses_bad_settings():
    with pytest.raises(ValueError, match="probability"):
        D.RandomDegradation(blur_p=1.5)
    with pytest.raises(ValueError, match="empty"):
        D.RandomDegradation(jpeg_quality=(60, 10))
    with pytest.raises(ValueError, match="RGB uint8"):
        D.gaussian_blur(np.zeros((8, 8), np.uint8), 1.0)


def test_train_transform_degrades_reproducibly_and_only_when_asked():
    photo = face_crop(3)
    plain = TrainTransform(flip_p=0.0)
    off = TrainTransform(flip_p=0.0, degrade=D.RandomDegradation(p=0.0))
    assert torch.equal(plain(photo), off(photo))
    on = TrainTransform(flip_p=0.0, degrade=D.RandomDegradation(p=1.0))
    torch.manual_seed(5)
    a = torch.stack([on(photo) for _ in range(6)])
    torch.manual_seed(5)
    b = torch.stack([on(photo) for _ in range(6)])
    assert torch.equal(a, b)  # torch's RNG (a worker's seed, a resumed run's state) decides
    assert all(not torch.equal(x, plain(photo)) for x in a)


def test_config_takes_degrade_and_round_trips(tmp_path):
    from training.config import Config, load_config

    base = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny_cpu.yaml"
    cfg = load_config(base, ["data.degrade={p: 0.7, jpeg_quality: [10, 20]}"])
    assert cfg.data.degrade == D.RandomDegradation(p=0.7, jpeg_quality=(10, 20))
    again = Config.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg
    assert load_config(base, ["data.degrade={}"]).data.degrade == D.RandomDegradation()
    assert load_config(base).data.degrade is None
    with pytest.raises(Exception, match="blurr"):
        load_config(base, ["data.degrade={blurr_p: 0.3}"])
