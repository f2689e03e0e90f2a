"""Evaluation inputs for the detector: L∞ attacks on the embedding and heavy corruptions.

All functions take and return model-input tensors, (B, 3, H, W) in [-1, 1] = (x/255 - 0.5)/0.5.
ε and every other intensity are given in [0, 1] pixel units (ε = 4/255 is "4 grey levels"), and
divided by the input std 0.5 internally, so ``x_adv - x`` stays within 2ε in input units, i.e.
within ε in pixel units. These exist to *evaluate* the detector; they are not a defence.

Attacks work on the embedding alone (no classifier head exists in open-set recognition):

- dodging (``target=None``): minimise the cosine to the clean embedding, so the face no longer
  matches its own gallery entry;
- impersonation (``target`` = embeddings of another person): maximise the cosine to the target.

``detector_score`` turns PGD into an adaptive attack: it also maximises a differentiable
in-distribution score (e.g. the detector's combined score on the features), so the adversarial
input tries to look genuine to the detector as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PIXEL_STD = 0.5


def _embedding_objective(model, x: torch.Tensor, reference: torch.Tensor, target: bool,
                         detector_score: Callable | None, detector_weight: float) -> torch.Tensor:
    out = model(x, return_features=detector_score is not None)
    cos = F.cosine_similarity(out.embedding, reference, dim=1)
    # Ascend this objective: away from the clean embedding, or toward the target one.
    objective = cos if target else -cos
    if detector_score is not None:
        objective = objective + detector_weight * detector_score(out.features)
    return objective.sum()


def _reference(model, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if target is not None:
        return target.detach()
    with torch.no_grad():
        return model(x).embedding.detach()


def fgsm(model, x: torch.Tensor, epsilon: float, target: torch.Tensor | None = None) -> torch.Tensor:
    """One signed-gradient step of size ε (Goodfellow et al. 2015) on the embedding cosine."""
    return pgd(model, x, epsilon, steps=1, step_size=epsilon, random_start=False, target=target)


def pgd(
    model,
    x: torch.Tensor,
    epsilon: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    target: torch.Tensor | None = None,
    detector_score: Callable | None = None,
    detector_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient ascent in the L∞ ball of radius ε (Madry et al. 2018); with
    ``random_start=False`` this is BIM (Kurakin et al. 2017). Default step 2.5·ε/steps, so the
    iterates can reach the ball's boundary and move along it."""
    model.eval()
    eps = epsilon / PIXEL_STD
    alpha = (2.5 * epsilon / steps if step_size is None else step_size) / PIXEL_STD
    x0 = x.detach()
    reference = _reference(model, x0, target)
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype) * 2 - 1
        x_adv = (x0 + eps * noise.to(x0.device)).clamp(-1.0, 1.0)
    else:
        x_adv = x0.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        obj = _embedding_objective(model, x_adv, reference, target is not None, detector_score,
                                   detector_weight)
        (grad,) = torch.autograd.grad(obj, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad.sign()
            # Project onto the ε ball around x0, then onto the valid pixel range.
            x_adv = torch.max(torch.min(x_adv, x0 + eps), x0 - eps).clamp(-1.0, 1.0)
    return x_adv.detach()


# --- corruptions: natural-looking damage that is not a "poor capture" of a face -----------------


def gaussian_blur(x: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur, ``sigma`` in pixels (4 px on a 112 crop wipes out identity)."""
    radius = max(1, round(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(pad, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def gaussian_noise(x: torch.Tensor, std: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive i.i.d. noise, ``std`` in [0, 1] pixel units."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (x + noise * std / PIXEL_STD).clamp(-1.0, 1.0)


def occlude(x: torch.Tensor, fraction: float = 0.4, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random axis-aligned block covering ``fraction`` of the image, filled with uniform noise
    (a flat fill would be an easy, unrealistic give-away)."""
    b, c, h, w = x.shape
    side_h, side_w = round(h * fraction**0.5), round(w * fraction**0.5)
    out = x.clone()
    for i in range(b):
        y0 = int(torch.randint(0, h - side_h + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, w - side_w + 1, (1,), generator=generator))
        patch = torch.rand((c, side_h, side_w), generator=generator, dtype=x.dtype) * 2 - 1
        out[i, :, y0 : y0 + side_h, x0 : x0 + side_w] = patch.to(x.device)
    return out


def brightness(x: torch.Tensor, factor: float = 3.0) -> torch.Tensor:
    """Multiply pixel intensities by ``factor`` (3: blown out; 0.15: nearly black), clipped."""
    pixels = x * PIXEL_STD + 0.5
    return ((pixels * factor).clamp(0.0, 1.0) - 0.5) / PIXEL_STD
