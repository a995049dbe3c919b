"""GAN losses of StyleGAN2: non-saturating logistic, R1 and path-length regularisation.

Every function returns one value per sample (shape [N]) and leaves the reduction to the caller:
a DP discriminator step needs the per-sample terms before clipping, a plain step takes the mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def g_logistic_ns(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss softplus(-D(G(z))): the non-saturating form, strong gradients early on."""
    return F.softplus(-fake_logits.float()).flatten(1).sum(1)


def d_logistic(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss softplus(D(fake)) + softplus(-D(real)), paired per row."""
    return d_logistic_real(real_logits) + d_logistic_fake(fake_logits)


def d_logistic_real(real_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits.float()).flatten(1).sum(1)


def d_logistic_fake(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake_logits.float()).flatten(1).sum(1)


def r1_penalty(
    discriminator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    real_images: torch.Tensor,
    real_c: torch.Tensor,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """||grad_x D(aug(x), c)||^2 per sample, the gradient taken through the augmentation.

    Returns (penalty [N], logits [N, 1]); the caller scales the penalty by gamma / 2. The graph is
    kept (create_graph) so the penalty can be back-propagated into D's weights.
    """
    x = real_images.detach().requires_grad_(True)
    x_in = augment(x) if augment is not None else x
    logits = discriminator(x_in, real_c)
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True, only_inputs=True)
    return grad.square().flatten(1).sum(1), logits


def path_length(
    images: torch.Tensor, ws: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample path length ||J_w^T y||, y ~ N(0, I) / sqrt(H W) (StyleGAN2, section 3.2).

    ``ws`` must be part of the graph that produced ``images``; the result keeps the graph.
    """
    h, w = images.shape[2], images.shape[3]
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(images.device, images.dtype) / float(h * w) ** 0.5
    (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True, only_inputs=True)
    return grad.float().square().sum(2).mean(1).sqrt()


def path_length_penalty(
    lengths: torch.Tensor, pl_mean: torch.Tensor, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(penalty [N], updated running mean): (|J^T y| - a)^2 with a the exponential mean of lengths.

    The new mean is detached; the caller stores it.
    """
    new_mean = pl_mean.lerp(lengths.detach().mean(), decay)
    return (lengths - new_mean).square(), new_mean
