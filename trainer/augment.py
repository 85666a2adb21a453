"""The paper's augmentation as batched tensor ops, on whatever device the batch is on.

Per image, in the authors' order: RandomResizedCrop(size, scale=(0.2, 1), ratio=(3/4, 4/3)),
ColorJitter(0.4, 0.4, 0.4, 0.4) (the four adjustments in a random order per image, as
torchvision does), RandomGrayscale(p=0.2), optionally RandomHorizontalFlip(p=0.5) (off by
default, as in the released configs), then normalise.

Every random number comes from one CPU ``torch.Generator`` in a fixed order (crop, flip, jitter
factors and order, grayscale), then moves to the batch's device: the same generator state gives
the same augmented batch on CPU and GPU, a resumed run that re-seeds its generators gets
the same images as an uninterrupted one, and W ranks that share one generator state give each
image of a global batch the augmentation one process gives it (:func:`augment`). The image ops
themselves (grid_sample, blends, HSV conversion) run on the batch's device, so GPU augmentation
comes for free, without the host ever waiting for the GPU.

The flip is folded into the crop's affine sampling grid (it commutes with the colour ops), so
crop + resize + flip is one ``grid_sample`` call. Colour ops follow torchvision's tensor
definitions (``adjust_brightness`` ... ``rgb_to_grayscale``) and are tested against them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentSpec:
    """What to apply; ``size`` is the output side in pixels."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4)  # brightness, contrast, saturation, hue
    grayscale_p: float = 0.2
    # Off, as released: `random_horizontal_flip` is commented out in the authors' base.yaml and
    # the flip is commented out in lemniscate's CIFAR pipeline (only its ImageNet one flips).
    # hflip=True (--hflip) adds it, in the authors' transform order (after grayscale).
    hflip: bool = False


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 in [0, 1]; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (x - mean) / std per channel."""
    # non_blocking: a blocking host-to-GPU copy waits for every queued kernel first
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1).to(images.device, non_blocking=True)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1).to(images.device, non_blocking=True)
    return (images - m) / s


def resized_crop_boxes(batch: int, height: int, width: int, scale, ratio,
                       generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for a whole batch: (B, 4) float (top, left, h, w).

    Ten tries per image of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first try
    that fits is used, the centre crop of the whole image otherwise (as torchvision falls back).
    """
    tries = 10
    area = height * width
    target_area = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(batch, tries, generator=generator))
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(batch, tries, generator=generator))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.to(torch.int8), dim=1)  # index of the first fitting try
    any_fit = fits.any(dim=1)
    rows = torch.arange(batch)
    w, h = w[rows, first], h[rows, first]
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    u = torch.rand(batch, 2, generator=generator)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    top = torch.where(any_fit, top, (height - h) // 2)
    left = torch.where(any_fit, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def crop_resize_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box, resize bilinearly to (size, size), mirror where ``flip``.

    images (B, 3, H, W) float; boxes (B, 4) (top, left, h, w) in pixels; flip (B,) bool.
    One affine grid per image: output x in [-1, 1] maps to input x = sx * x + tx with
    sx = w / W and tx = (2 left + w) / W - 1 (align_corners=False pixel centres); a flip negates sx.
    """
    _, _, height, width = images.shape
    boxes = boxes.to(images.device, images.dtype)
    top, left, h, w = boxes.unbind(1)
    sx = w / width
    sy = h / height
    sx = torch.where(flip.to(images.device), -sx, sx)
    tx = (2 * left + w) / width - 1
    ty = (2 * top + h) / height - 1
    zeros = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zeros, tx], 1), torch.stack([zeros, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = images.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, clamped to [0, 1]; factor (B,)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(images, factor):
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images, factor):
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images, factor):
    return _blend(images, grayscale(images), factor)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, every channel in [0, 1] (torchvision's convention)."""
    r, g, b = images.unbind(1)
    maxc = images.max(dim=1).values
    minc = images.min(dim=1).values
    chroma = maxc - minc
    flat = chroma == 0
    safe_chroma = torch.where(flat, torch.ones_like(chroma), chroma)
    s = chroma / torch.where(flat, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe_chroma, (maxc - g) / safe_chroma, (maxc - b) / safe_chroma
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV in [0, 1] -> RGB: channel n in (R, G, B) = v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6 and n = 5, 3, 1."""
    h, s, v = hsv.unbind(1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * h, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1).clamp_(0.0, 1.0)


def adjust_hue(images, factor):
    hsv = rgb_to_hsv(images)
    h = torch.remainder(hsv[:, 0] + factor.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=1))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def jitter_params(batch: int, strength, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B, 4) (brightness, contrast, saturation, hue) and per-image op order (B, 4).

    Brightness/contrast/saturation ~ U(max(0, 1 - s), 1 + s); hue ~ U(-s, s): torchvision's ranges.
    """
    u = torch.rand(batch, 4, generator=generator)
    lo = torch.tensor([max(0.0, 1 - s) for s in strength[:3]] + [-strength[3]])
    hi = torch.tensor([1 + s for s in strength[:3]] + [strength[3]])
    factors = lo + (hi - lo) * u
    order = torch.argsort(torch.rand(batch, 4, generator=generator), dim=1)
    return factors, order


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Apply the four adjustments to each image in its own order.

    images (B, 3, H, W) in [0, 1]; factors (B, 4); order (B, 4) a permutation of 0..3 per row.
    On CPU, at each of the 4 positions each op runs only on the images that have it there (the
    cost is four full-batch ops whatever the orders). On a GPU, picking those rows would need
    the host to read ``order`` back 16 times per batch, stalling the queue of kernels; there
    :func:`color_jitter_masked` computes the same values without reading anything back.
    """
    if images.device.type != "cpu":
        return color_jitter_masked(images, factors, order)
    factors = factors.to(images.device, images.dtype)
    order = order.to(images.device)
    out = images.clone()
    for position in range(4):
        for op_id, op in enumerate(_JITTER_OPS):
            rows = torch.nonzero(order[:, position] == op_id).flatten()
            if rows.numel():
                out[rows] = op(out[rows], factors[rows, op_id])
    return out


def color_jitter_masked(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """:func:`color_jitter` without host synchronisation, the same values.

    At each position, brightness, contrast and saturation run on every image, with factor 1 for
    the images that do not have that op there: a blend with factor 1 is 1 * x + 0 * y = x
    exactly. Hue has no exact identity factor (the HSV round trip rounds), so it runs on every
    image and ``torch.where`` keeps it only where it belongs. Costs about 4x the ops of the
    row-picking version, which is small next to a network on a GPU.
    """
    factors = factors.to(images.device, images.dtype)
    order = order.to(images.device)
    out = images
    for position in range(4):
        here = order[:, position]                                   # (B,) op id at this position
        for op_id, op in enumerate(_JITTER_OPS[:3]):
            out = op(out, torch.where(here == op_id, factors[:, op_id], torch.ones_like(factors[:, op_id])))
        out = torch.where((here == 3).view(-1, 1, 1, 1), adjust_hue(out, factors[:, 3]), out)
    return out


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of one batch of B images (CPU tensors)."""
    boxes: torch.Tensor    # (B, 4) float (top, left, h, w) crop boxes in pixels
    flip: torch.Tensor     # (B,) bool
    factors: torch.Tensor  # (B, 4) float brightness, contrast, saturation, hue
    order: torch.Tensor    # (B, 4) int64 per-image order of the four jitter ops
    gray: torch.Tensor     # (B,) bool

    def rows(self, start: int, step: int) -> AugmentDraw:
        """Rows start, start + step, ... (one rank's share of a global batch's draw)."""
        return AugmentDraw(*(t[start::step] for t in (self.boxes, self.flip, self.factors, self.order, self.gray)))

    def to(self, device: torch.device) -> AugmentDraw:
        """The same parameters on ``device``: one asynchronous copy of a (B, 14) block (five
        small blocking copies per batch would each wait for the GPU's queue to drain)."""
        if device.type == "cpu":
            return self
        block = torch.cat([self.boxes.float(), self.flip.float()[:, None], self.factors.float(),
                           self.order.float(), self.gray.float()[:, None]], dim=1)
        if device.type == "cuda":
            block = block.pin_memory()
        block = block.to(device, non_blocking=True)
        boxes, flip, factors, order, gray = block.split([4, 1, 4, 4, 1], dim=1)
        return AugmentDraw(boxes, flip[:, 0] > 0.5, factors, order.round().long(), gray[:, 0] > 0.5)


def draw_params(batch: int, height: int, width: int, spec: AugmentSpec, generator: torch.Generator) -> AugmentDraw:
    """Draw the parameters of ``batch`` images of (height, width) from ``generator``, in a fixed
    order (crops, flips, jitter factors and order, grayscale): the generator advances by an
    amount that depends only on ``batch``."""
    boxes = resized_crop_boxes(batch, height, width, spec.scale, spec.ratio, generator)
    flip_draw = torch.rand(batch, generator=generator) < 0.5
    flip = flip_draw if spec.hflip else torch.zeros_like(flip_draw)
    factors, order = jitter_params(batch, spec.jitter, generator)
    gray = torch.rand(batch, generator=generator) < spec.grayscale_p
    return AugmentDraw(boxes, flip, factors, order, gray)


def apply_params(images: torch.Tensor, params: AugmentDraw, spec: AugmentSpec) -> torch.Tensor:
    """(B, 3, H, W) uint8 or float in [0, 1] -> (B, 3, size, size) augmented, normalised float32."""
    params = params.to(images.device)
    x = crop_resize_flip(to_float(images), params.boxes, params.flip, spec.size)
    x = color_jitter(x, params.factors, params.order)
    x = torch.where(params.gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    return normalize(x, spec.mean, spec.std)


def augment(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator,
            rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Augment a batch: (b, 3, H, W) uint8 or float in [0, 1] -> (b, 3, size, size) normalised
    float32, on the batch's device. ``generator`` (CPU) is advanced by a fixed amount per call.

    With W ranks, ``images`` is rank ``rank``'s share of a global batch of W * b images (its
    positions rank, rank + W, ... as ``trainer.sharding`` deals them): every rank draws the
    parameters of the whole global batch from the same generator and applies its own rows, so
    each image gets exactly the augmentation a one-process run gives it. Drawing W * b
    parameter sets costs microseconds; the image ops run on b images only.
    """
    batch, _, height, width = images.shape
    params = draw_params(batch * world_size, height, width, spec, generator)
    return apply_params(images, params.rows(rank, world_size), spec)


def prepare_eval(images: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """No augmentation: (B, 3, H, W) -> normalised float32, resized to ``spec.size`` if needed."""
    x = to_float(images)
    if x.shape[-1] != spec.size or x.shape[-2] != spec.size:
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x, spec.mean, spec.std)
