"""The effective receptive field (ERF) of the last feature map and the label weights of Eq. 2 (§3.3).

``papers/montage_jigsaw.txt`` §3.3: the soft label of feature position (j, k) mixes the four region labels with
weights w_i (Eq. 1) proportional to the share of its ERF mass inside each region, with at least tau for its own
region (Eq. 2, reconstructed in PAPER_NOTES.md, "Eq. 2"). One table of weights serves every image (the template is
fixed); §4.1 refreshes it every 5k iterations with the current model. The ERF is the gradient ERF of Luo et al. [17].
The losses (Eq. 1 and the three strategies of Tab. 2) are in ``detpretrain.losses``.

Glossary:

    R = 4          template regions in REGION_NAMES order (TL, TR, BL, BR)
    H, W           canvas (assembled image) height and width
    h, w           the last feature map (stride 32 before pooling: 7 x 7 on a 224 canvas)
    erf            (h, w, H, W) float >= 0: mean |d feature(j, k) / d input| summed over RGB
    shares         (h, w, R) float: rho_i of Eq. 2, the share of the ERF mass of position (j, k) inside region i
    label_weights  (h, w, R) float: w_i of Eq. 2; each position's weights sum to 1
    region_index   (h, w) int64 in [0, R): the region that holds the centre of each feature cell
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detpretrain.jigsaw.template import JigsawTemplate, feature_region_index

__all__ = ["compute_erf", "erf_label_weights", "erf_region_shares", "label_weights_from_shares"]


@torch.enable_grad()
def compute_erf(model: nn.Module, images: Tensor, *, chunk_size: int = 32) -> Tensor:
    """Gradient-based effective receptive field of every position of the last feature map (Luo et al. [17]).

    For position (j, k): the gradient at (j, k) of the feature map (``model.forward_features`` if the model has
    it, else ``model(x)``; (B, C, h, w), before pooling) is set to 1 on every channel and 0 elsewhere, propagated
    to the input, |gradient| summed over RGB, then averaged over ``images`` (B, 3, H, W), a fixed batch of
    assembled, normalized images (PAPER_NOTES.md). Setting all channels at (j, k) to 1 is our reading of
    "the output gradient" for a multi-channel map. The model runs in eval mode (BN with running statistics:
    batch statistics would pass gradient between images) and its train/eval state is restored afterwards; no
    parameter gradient is touched.

    Each (image, position) pair needs its own backward; pairs are processed ``chunk_size`` at a time as one batch
    (exact, as eval-mode samples do not interact). Returns (h, w, H, W) float32 on the images' device.
    """
    feature_fn = model.forward_features if hasattr(model, "forward_features") else model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = feature_fn(images[:1])
        if probe.ndim != 4:
            raise ValueError(f"the model's feature map must be (B, C, h, w), got {tuple(probe.shape)}")
        num_images, _, height, width = images.shape
        fh, fw = probe.shape[2:]
        erf = torch.zeros((fh * fw, height, width), dtype=torch.float32, device=images.device)
        pairs = torch.arange(fh * fw * num_images, device=images.device)
        for chunk in pairs.split(chunk_size):
            image_id, position = chunk % num_images, chunk // num_images
            x = images[image_id].detach().clone().requires_grad_(True)
            features = feature_fn(x)
            grad_output = torch.zeros_like(features)
            grad_output[torch.arange(len(chunk)), :, position // fw, position % fw] = 1.0
            (grad_input,) = torch.autograd.grad(features, x, grad_output)
            erf.index_add_(0, position, grad_input.abs().sum(dim=1).float())
    finally:
        model.train(was_training)
    return (erf / num_images).view(fh, fw, height, width)


def erf_region_shares(erf: Tensor, *, template: JigsawTemplate) -> Tensor:
    """(h, w, R): rho_i = sum(G * M^i) / sum(G) for every feature position (Eq. 2's ratios).

    A position with an all-zero ERF (a dead unit) gets its own region's share 1 (our guard: Eq. 2 is 0/0 there).
    """
    fh, fw, height, width = erf.shape
    if (height, width) != (template.canvas_height, template.canvas_width):
        raise ValueError(
            f"ERF is over a {height}x{width} input but the template canvas is "
            f"{template.canvas_height}x{template.canvas_width}"
        )
    masks = template.region_masks().to(device=erf.device, dtype=erf.dtype)
    mass = torch.einsum("jkyx,ryx->jkr", erf, masks)
    total = mass.sum(dim=-1, keepdim=True)
    own = nn.functional.one_hot(
        feature_region_index(template, feature_height=fh, feature_width=fw).to(erf.device), 4
    ).to(erf.dtype)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(erf.dtype).tiny), own)


def label_weights_from_shares(shares: Tensor, *, region_index: Tensor, erf_threshold: float = 0.7) -> Tensor:
    """Eq. 2 (PAPER_NOTES.md reconstruction): the label weights w_i of each position from its ERF shares rho_i.

    For a position in region r: w_r = max(tau, rho_r); for i != r: w_i = (1 - w_r) rho_i / sum_{i' != r} rho_i'
    (the denominator is Eq. 2's sum G (1 - M^r) / sum G). When rho_r >= tau this gives w = rho; tau = 1 gives the
    one-hot label of the region. When rho_r = 1 the others are 0/0 and are set to 0 (w_r = 1).
    ``erf_threshold`` is tau, 0.7 in the paper (§4.1).
    """
    if not 0.0 <= erf_threshold <= 1.0:
        raise ValueError(f"erf_threshold must be in [0, 1], got {erf_threshold}")
    if shares.shape[:2] != region_index.shape or shares.shape[-1] != 4:
        raise ValueError(
            f"shares {tuple(shares.shape)} must be (h, w, 4) over region_index {tuple(region_index.shape)}"
        )
    own = nn.functional.one_hot(region_index.to(shares.device), 4).to(dtype=torch.bool)
    rho_own = (shares * own).sum(dim=-1, keepdim=True)
    w_own = rho_own.clamp_min(erf_threshold)
    others = shares * ~own
    others_total = others.sum(dim=-1, keepdim=True)
    w_others = torch.where(others_total > 0, (1 - w_own) * others / others_total.clamp_min(1e-30), 0.0)
    return torch.where(own, torch.where(others_total > 0, w_own, 1.0), w_others)


def erf_label_weights(erf: Tensor, *, template: JigsawTemplate, erf_threshold: float = 0.7) -> Tensor:
    """(h, w, R) label weights of Eq. 2 from an ERF table (compute_erf): one table for every image (§3.3)."""
    fh, fw = erf.shape[:2]
    region_index = feature_region_index(template, feature_height=fh, feature_width=fw).to(erf.device)
    return label_weights_from_shares(
        erf_region_shares(erf, template=template), region_index=region_index, erf_threshold=erf_threshold
    )
