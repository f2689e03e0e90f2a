"""Evaluation inputs for the detector: L∞ attacks on the embedding and heavy corruptions.

All functions take and return model-input tensors, (B, 3, H, W) in [-1, 1] = (x/255 - 0.5)/0.5.
ε and every other intensity are given in [0, 1] pixel units (ε = 4/255 is "4 grey levels"), and
divided by the input std 0.5 internally, so ``x_adv - x`` stays within 2ε in input units, i.e.
within ε in pixel units. These exist to *evaluate* the detector; they are not a defence.

Attacks work on the embedding alone (no classifier head exists in open-set recognition):

- dodging (``target=None``): minimise the cosine to a ``reference`` embedding of the same person,
  so the face no longer matches its gallery entry. Pass the gallery embedding (another photo of
  the person), as face-recognition robustness benchmarks do: the default, the clean input's own
  embedding, has a cosine whose gradient is exactly zero at the clean input, so a single FGSM step
  from there follows float rounding noise (a random sign pattern), not the model;
- impersonation (``target`` = embeddings of another person): maximise the cosine to the target.

``detector_score`` turns PGD into an adaptive attack: it also maximises a differentiable
in-distribution score (e.g. the detector's combined score on the features), so the adversarial
input tries to look genuine to the detector as well.

``input_transform`` attacks something other than the model input: with an :class:`AlignmentWarp`
the attacker perturbs the *whole photo* and the gradient flows through the face alignment, which
is what a service that detects and aligns faces itself receives (the perturbed photo is then
detected and aligned again by the real pipeline, see ``benchmarks/ood_eval.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PIXEL_STD = 0.5


def _embedding_objective(model, x: torch.Tensor, reference: torch.Tensor, target: bool,
                         detector_score: Callable | None, detector_weight: float,
                         input_transform: Callable | None = None) -> torch.Tensor:
    if input_transform is not None:
        x = input_transform(x)
    out = model(x, return_features=detector_score is not None)
    cos = F.cosine_similarity(out.embedding, reference, dim=1)
    # Ascend this objective: away from the clean embedding, or toward the target one.
    objective = cos if target else -cos
    if detector_score is not None:
        # The detector's layers: the model's feature taps, or (a model without any, e.g. an imported
        # recognizer) its raw embedding, as facerec.bundle.ood_layer_outputs reads a graph.
        objective = objective + detector_weight * detector_score(out.features or [out.embedding])
    return objective.sum()


def _reference(model, x: torch.Tensor, target: torch.Tensor | None, input_transform: Callable | None = None,
               reference: torch.Tensor | None = None) -> torch.Tensor:
    if target is not None:
        return target.detach()
    if reference is not None:
        return reference.detach()
    with torch.no_grad():
        return model(x if input_transform is None else input_transform(x)).embedding.detach()


def fgsm(model, x: torch.Tensor, epsilon: float, target: torch.Tensor | None = None,
         input_transform: Callable | None = None, reference: torch.Tensor | None = None) -> torch.Tensor:
    """One signed-gradient step of size ε (Goodfellow et al. 2015) on the embedding cosine. For
    dodging, give ``reference`` (see the module doc: without it the step has no real gradient)."""
    return pgd(model, x, epsilon, steps=1, step_size=epsilon, random_start=False, target=target,
               input_transform=input_transform, reference=reference)


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
    input_transform: Callable | None = None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient ascent in the L∞ ball of radius ε (Madry et al. 2018); with
    ``random_start=False`` this is BIM (Kurakin et al. 2017). Default step 2.5·ε/steps, so the
    iterates can reach the ball's boundary and move along it. ``x`` is what the attacker changes;
    the model sees ``input_transform(x)`` (default: ``x`` itself). ``reference``: the embeddings
    dodging moves away from (default: those of the clean input)."""
    model.eval()
    eps = epsilon / PIXEL_STD
    alpha = (2.5 * epsilon / steps if step_size is None else step_size) / PIXEL_STD
    x0 = x.detach()
    reference = _reference(model, x0, target, input_transform, reference)
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype) * 2 - 1
        x_adv = (x0 + eps * noise.to(x0.device)).clamp(-1.0, 1.0)
    else:
        x_adv = x0.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        obj = _embedding_objective(model, x_adv, reference, target is not None, detector_score,
                                   detector_weight, input_transform)
        (grad,) = torch.autograd.grad(obj, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad.sign()
            # Project onto the ε ball around x0, then onto the valid pixel range.
            x_adv = torch.max(torch.min(x_adv, x0 + eps), x0 - eps).clamp(-1.0, 1.0)
    return x_adv.detach()


class AlignmentWarp:
    """A differentiable twin of ``facerec.data.align.norm_crop`` on model-input tensors.

    ``matrices`` (B, 2, 3) map photo pixels to crop pixels (``estimate_norm``), one per photo of
    the batch; calling the warp on (B, 3, H, W) photos in [-1, 1] gives the (B, 3, size, size)
    crops that ``cv2.warpAffine(..., borderValue=0)`` would give: bilinear sampling at the inverse
    map of every crop pixel centre, black (-1) outside the photo. cv2 rounds its bilinear weights
    to 1/32, so the two agree to about one grey level, not bit for bit.
    """

    def __init__(self, matrices, image_hw: tuple[int, int], size: int = 112) -> None:
        m = torch.as_tensor(matrices, dtype=torch.float64).reshape(-1, 2, 3)
        full = torch.cat([m, torch.tensor([0.0, 0.0, 1.0], dtype=m.dtype).expand(len(m), 1, 3)], 1)
        inv = torch.linalg.inv(full)[:, :2]  # crop pixel -> photo pixel
        v, u = torch.meshgrid(torch.arange(size, dtype=m.dtype), torch.arange(size, dtype=m.dtype),
                              indexing="ij")
        pts = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)  # (S*S, 3)
        src = torch.einsum("bij,nj->bni", inv, pts)  # (B, S*S, 2) in photo pixels (x, y)
        h, w = image_hw
        # align_corners=True: -1 and +1 are the centres of the first and last pixel, as in cv2.
        grid = torch.stack([src[..., 0] / (w - 1) * 2 - 1, src[..., 1] / (h - 1) * 2 - 1], -1)
        self.grid = grid.reshape(len(m), size, size, 2).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Shifted by +1 so that grid_sample's zero padding is black (-1) once shifted back.
        out = F.grid_sample(x + 1.0, self.grid.to(x.device, x.dtype), mode="bilinear",
                            padding_mode="zeros", align_corners=True)
        return out - 1.0


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


def gaussian_noise(x: torch.Tensor, std: float = 0.2,
                   generator: torch.Generator | None = None) -> torch.Tensor:
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
