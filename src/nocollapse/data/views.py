"""Augmented views: the two-view asymmetric recipe and DINO multi-crop, from one spec.

A :class:`ViewSpec` lists the crops to produce from each image: two *global* crops (with their
own blur / solarisation probabilities: the asymmetric recipe of BYOL / solo-learn) and
``local_crops`` small crops (DINO multi-crop). ``local_crops = 0`` is the two-view pipeline.

Two interchangeable back-ends produce the crops:

* :class:`BatchedViews` augments a whole ``uint8`` batch on the training device with kornia
  (per-sample random parameters). Images held in memory never leave tensors, which keeps the
  augmentation cost small next to the model even on a CPU.
* :class:`PerSampleViews` applies torchvision transforms to one PIL image at a time, inside
  DataLoader workers, for datasets read from files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ViewsConfig


@dataclass(frozen=True)
class CropSpec:
    size: int
    scale: tuple[float, float]
    blur: float
    solarize: float


@dataclass(frozen=True)
class ViewSpec:
    global_crops: tuple[CropSpec, CropSpec]
    local_crop: CropSpec | None
    local_crops: int
    hflip: float
    color_jitter: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_crops(self) -> int:
        return 2 + self.local_crops

    @property
    def crop_sizes(self) -> list[int]:
        sizes = [c.size for c in self.global_crops]
        if self.local_crop is not None:
            sizes += [self.local_crop.size] * self.local_crops
        return sizes


def default_local_size(global_size: int) -> int:
    """DINO's 96 px local crops for 224 px global crops, scaled to other sizes."""
    return max(4, round(global_size * 3 / 7))


def build_view_spec(cfg: ViewsConfig, image_size: int, mean, std) -> ViewSpec:
    g = cfg.global_size or image_size
    globals_ = tuple(
        CropSpec(g, tuple(cfg.global_scale), cfg.blur[i], cfg.solarize[i]) for i in range(2))
    local = None
    if cfg.local_crops > 0:
        local = CropSpec(cfg.local_size or default_local_size(g), tuple(cfg.local_scale),
                         cfg.local_blur, 0.0)
        if local.size > g:
            raise ValueError(f"views.local_size ({local.size}) is larger than the global crops ({g})")
    return ViewSpec(globals_, local, cfg.local_crops, cfg.hflip, cfg.color_jitter, cfg.brightness,
                    cfg.contrast, cfg.saturation, cfg.hue, cfg.grayscale, tuple(mean), tuple(std))


def blur_kernel_size(size: int) -> int:
    """An odd kernel about a tenth of the crop side (23 px at 224 px), at least 3."""
    k = max(3, int(0.1 * size))
    return k if k % 2 == 1 else k + 1


# --------------------------------------------------------------------------------------------
# Batched back-end (kornia, on the training device)
# --------------------------------------------------------------------------------------------

class BatchedViews(nn.Module):
    """uint8 ``[B, 3, H, W]`` -> list of normalised float crops, one tensor per crop."""

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__()
        self.spec = spec
        self.global_pipelines = nn.ModuleList([self._pipeline(c) for c in spec.global_crops])
        self.local_pipeline = self._pipeline(spec.local_crop) if spec.local_crop else None

    def _pipeline(self, crop: CropSpec) -> nn.Module:
        import kornia.augmentation as K

        s = self.spec
        ops: list[nn.Module] = [K.RandomResizedCrop((crop.size, crop.size), scale=crop.scale)]
        if s.hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=s.hflip))
        if s.color_jitter > 0:
            ops.append(K.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue, p=s.color_jitter))
        if s.grayscale > 0:
            ops.append(K.RandomGrayscale(p=s.grayscale))
        if crop.blur > 0:
            ops.append(K.RandomGaussianBlur(blur_kernel_size(crop.size), (0.1, 2.0), p=crop.blur))
        if crop.solarize > 0:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=crop.solarize))
        ops.append(K.Normalize(torch.tensor(s.mean), torch.tensor(s.std)))
        return nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float().div_(255)
        crops = [p(x) for p in self.global_pipelines]
        if self.local_pipeline is not None:
            crops += [self.local_pipeline(x) for _ in range(self.spec.local_crops)]
        return crops


# --------------------------------------------------------------------------------------------
# Per-sample back-end (torchvision, in DataLoader workers)
# --------------------------------------------------------------------------------------------

class PerSampleViews:
    """PIL image -> list of normalised float crops."""

    def __init__(self, spec: ViewSpec) -> None:
        self.spec = spec
        self.global_pipelines = [self._pipeline(c) for c in spec.global_crops]
        self.local_pipeline = self._pipeline(spec.local_crop) if spec.local_crop else None

    def _pipeline(self, crop: CropSpec):
        from torchvision.transforms import v2 as T

        s = self.spec
        return T.Compose([
            T.RandomResizedCrop(crop.size, scale=crop.scale, antialias=True),
            T.RandomHorizontalFlip(p=s.hflip),
            T.RandomApply([T.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue)], p=s.color_jitter),
            T.RandomGrayscale(p=s.grayscale),
            T.RandomApply([T.GaussianBlur(blur_kernel_size(crop.size), (0.1, 2.0))], p=crop.blur),
            T.RandomSolarize(threshold=128, p=crop.solarize),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(s.mean, s.std),
        ])

    def __call__(self, image) -> list[torch.Tensor]:
        crops = [p(image) for p in self.global_pipelines]
        if self.local_pipeline is not None:
            crops += [self.local_pipeline(image) for _ in range(self.spec.local_crops)]
        return crops


def eval_transform(size: int, mean, std):
    """Deterministic evaluation transform for file-backed images: resize, centre crop, normalise."""
    from torchvision.transforms import v2 as T

    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.PILToTensor(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def normalize_uint8(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Evaluation preprocessing of an in-memory uint8 batch: resize to ``size`` when needed and
    normalise with the dataset statistics."""
    x = images.float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                      align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
