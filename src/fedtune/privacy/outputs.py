"""Noise on what leaves a client in the frameworks that do not average parameters.

* KD-FedLLM (``privacy.kd_noise = σ``): a client uploads, for each of the S public samples, its
  probability vector ``p = softmax(logits / T)`` plus ``N(0, σ^2)`` per class (PATE-style noisy
  knowledge). Whatever its private data, a probability vector moves by at most ``sqrt(2)`` in
  L2, so one round's upload (S vectors) has sensitivity ``sqrt(2 S)`` with respect to
  replacing the client's whole data: a Gaussian mechanism of multiplier ``σ / sqrt(2 S)``,
  composed over the rounds it took part in. The noisy vector travels as logits
  ``T · log(max(p + noise, 1e-6))``, so the server's softmax sees the clamped, renormalized
  noisy probabilities (post-processing).
* Split-FedLLM (``privacy.split_noise = σ``, ``privacy.split_clip = C``): each sample's
  cut-layer activations ``[L, H]`` are clipped to L2 norm ``C`` and get ``N(0, σ^2)`` per
  value before they leave the client (c2). Replacing one sample moves its row by at most
  ``2C``: each time a sample is sent it is a Gaussian mechanism of multiplier ``σ / (2C)``,
  composed over the times it was sent. This covers the sample's *features* only: Split sends
  its label in the clear (for generation, the label is the response text), and no epsilon
  covers labels.
"""

from __future__ import annotations

import math

import torch

from . import accountant


def noisy_logits(logits: torch.Tensor, temperature: float, std: float, gen) -> torch.Tensor:
    """``[S, C]`` logits -> logits of the noised probabilities ``softmax(logits / T) + N(0,
    std^2)``, clamped at 1e-6 (float32)."""
    p = (logits.float() / temperature).softmax(-1)
    noisy = p + torch.randn(p.shape, generator=gen) * std
    return temperature * noisy.clamp_min(1e-6).log()


def kd_epsilon(std: float, samples: int, participations: int, delta: float) -> float:
    """Epsilon of a KD client's noisy uploads after ``participations`` rounds of S samples."""
    return accountant.gaussian_epsilon(std / math.sqrt(2 * samples), participations, delta)


def clip_rows(h: torch.Tensor, bound: float) -> torch.Tensor:
    """Each sample's activations ``h [B, ...]`` scaled to L2 norm at most ``bound``
    (differentiable: the client back-propagates through the scaling)."""
    norms = h.float().flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (bound / norms).clamp(max=1.0).to(h.dtype)
    return h * factor.view(-1, *([1] * (h.dim() - 1)))


def noisy_activations(h: torch.Tensor, bound: float, std: float, gen) -> torch.Tensor:
    """``clip_rows(h) + N(0, std^2)`` (noise drawn on CPU from ``gen``, then moved)."""
    noise = torch.randn(h.shape, generator=gen) * std
    return clip_rows(h, bound) + noise.to(h.device, h.dtype)


def split_epsilon(std: float, bound: float, uses: int, delta: float) -> float:
    """Epsilon of one sample's activations after it was sent ``uses`` times."""
    return accountant.gaussian_epsilon(std / (2 * bound), uses, delta)
