"""Region visual tokens for single-stream models (VL-BERT / UNITER style).

Where it sits: besides (or instead of) patch tokens, a single-stream model can take one visual
token per box (a detector's, or the dataset's). The flow is

    image -> ViT patch grid or a Swin stage's map (B, C, Hg, Wg)
          --RoIRegionFeatures(boxes)--> (B, R, C)
          --RegionEmbed(boxes)--> (B, R, width) region tokens -> BertEmbed(inputs_embeds=...)

- `roi_align`: pure-PyTorch RoIAlign with the semantics of torchvision.ops.roi_align and
  Detectron2's ROIAlignV2 (aligned=True), vectorised over rois and bins (no torchvision here).
- `box_geometry`: UNITER's 7-d location feature [x1, y1, x2, y2, w, h, w*h].
- `RegionEmbed`: UNITER's ImageEmbeddings (region feature + location, each projected and
  normalised, summed, normalised again), without its dropout.
- `RoIRegionFeatures`: boxes normalised to the image -> one pooled vector per box from a grid
  (a Swin stage's map at spatial scale 1/stride).
- `grid_cell_boxes`: each token of a Swin grid as the box of its cell, normalised to the image
  (the 2-D positions of a single stream's Swin visual tokens).
"""
from __future__ import annotations

import torch
from torch import nn


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return int(oh), int(ow)


def _bilinear_axis(coords: torch.Tensor, size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of torchvision's `bilinear_interpolate` (roi_align_common.h), on a tensor.

    coords: sample positions along an axis of `size` cells (cell i has its centre at i).
    Returns (low, high) long indices and their weights (w_low, w_high), in coords' shape.
    The kernel's border rules, per axis:
    - a sample outside [-1, size] contributes 0 (NaN too: it fails both comparisons);
    - otherwise it is clamped to >= 0, and a low index at or past size-1 uses row size-1 for
      both neighbours with weight 1 (no zero padding between size-1 and size).
    Bilinear weights factorise (w1 = hy*hx, w2 = hy*lx, w3 = ly*hx, w4 = ly*lx), and so does the
    kernel's "either coordinate out -> the sample is 0" rule, so each axis is done on its own.
    """
    valid = (coords >= -1.0) & (coords <= size)
    c = torch.where(valid, coords, torch.zeros_like(coords)).clamp(min=0)  # no NaN reaches floor
    low = c.floor().long()  # c >= 0, so floor is the kernel's (int) truncation
    at_edge = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(c), c - low.to(c.dtype))  # the kernel's ly / lx
    valid = valid.to(c.dtype)
    return low, high, (1.0 - frac) * valid, frac * valid


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = True) -> torch.Tensor:
    """RoIAlign (He et al. 2017), with torchvision.ops.roi_align's exact semantics.

    features: (B, C, H, W); rois: (K, 5) rows [batch_index, x1, y1, x2, y2] in input coordinates,
    mapped to the feature map by `spatial_scale` (1 / patch_size for a ViT grid).
    Returns (K, C, oh, ow) in features' dtype.

    Each output bin averages sampling_ratio x sampling_ratio bilinear samples taken at the
    centres of its sub-bins. aligned=True (Detectron2's ROIAlignV2) shifts the scaled box by
    -0.5 so that pixel centres sit at integer coordinates; aligned=False (the original RoIAlign)
    does not, and widens boxes narrower than 1 to 1. Border handling follows torchvision's
    `bilinear_interpolate` (see `_bilinear_axis`).

    Differences from torchvision: only sampling_ratio > 0; its adaptive mode (<= 0:
    ceil(roi_size / output_size) samples per bin, different for each roi) gives every roi its own
    grid and does not vectorise. Coordinates and interpolation run in float32 at least (float64
    stays float64), so bf16/fp16 features are interpolated without rounding the weights.
    Autograd flows into `features`; rois get no gradient (as in torchvision). Batch indices are
    checked only on CPU (checking on an accelerator would cost a host sync).
    """
    if sampling_ratio <= 0:
        raise ValueError(f"sampling_ratio={sampling_ratio} is not supported: only a fixed "
                         "sampling_ratio > 0 (e.g. 2, Detectron2's default) vectorises; "
                         "torchvision's adaptive mode (<= 0) is not implemented")
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError("rois must be (K, 5) rows [batch_index, x1, y1, x2, y2], "
                         f"got shape {tuple(rois.shape)}")
    oh, ow = _pair(output_size)
    B, C, H, W = features.shape
    K, sr = rois.shape[0], sampling_ratio
    cdtype = torch.promote_types(features.dtype, torch.float32)  # coordinate / weight dtype
    rois = rois.detach().to(device=features.device, dtype=cdtype)

    batch = rois[:, 0].long()  # (K,), the kernel's (int) cast
    if features.device.type == "cpu" and K and (batch.min() < 0 or batch.max() >= B):
        raise ValueError(f"rois batch indices must lie in [0, {B}) for features with B={B}, "
                         f"got {rois[:, 0].tolist()}")

    offset = 0.5 if aligned else 0.0  # Detectron2's half-pixel correction
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - offset).unbind(1)  # (K,) each, map coords
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # the original RoIAlign forces malformed rois to be 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / ow, roi_h / oh  # (K,)

    # sample (bin p, sub-bin s) on an axis: start + p * bin + (s + .5) * bin / sr, the kernel's
    # expression in its order; bins and sub-bins of one axis are flattened p-major: (K, o * sr)
    sub = torch.arange(sr, device=features.device, dtype=cdtype) + 0.5  # (sr,)

    def samples(start: torch.Tensor, size: torch.Tensor, n_bins: int) -> torch.Tensor:
        p = torch.arange(n_bins, device=features.device, dtype=cdtype)  # (n_bins,)
        s = (start[:, None, None] + p[None, :, None] * size[:, None, None]
             + sub[None, None, :] * size[:, None, None] / sr)  # (K, n_bins, sr)
        return s.reshape(K, n_bins * sr)

    y_lo, y_hi, wy_lo, wy_hi = _bilinear_axis(samples(y1, bin_h, oh), H)  # (K, Sy), Sy = oh*sr
    x_lo, x_hi, wx_lo, wx_hi = _bilinear_axis(samples(x1, bin_w, ow), W)  # (K, Sx), Sx = ow*sr

    fmap = features.permute(0, 2, 3, 1)  # (B, H, W, C) view: each gather reads a C-vector
    b = batch[:, None, None]  # (K, 1, 1)
    out = None
    for yi, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
        for xi, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
            tap = fmap[b, yi[:, :, None], xi[:, None, :]].to(cdtype)  # (K, Sy, Sx, C)
            w = (wy[:, :, None] * wx[:, None, :])[..., None]  # (K, Sy, Sx, 1)
            out = w * tap if out is None else out + w * tap
    out = out.reshape(K, oh, sr, ow, sr, C).mean(dim=(2, 4))  # (K, oh, ow, C): average per bin
    return out.permute(0, 3, 1, 2).contiguous().to(features.dtype)  # (K, C, oh, ow)


def box_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) normalised [x1, y1, x2, y2] -> (..., 7) [x1, y1, x2, y2, w, h, w*h].

    UNITER's 7-d region location feature (Chen et al. 2020, Sec. 3.1): corners, width, height
    and area, all relative to the image.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must end in 4 coordinates [x1, y1, x2, y2], got shape "
                         f"{tuple(boxes.shape)}")
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)


def grid_cell_boxes(positions: torch.Tensor, stride: int, image_size: tuple[int, int]
                    ) -> torch.Tensor:
    """(N, 2) (row, col) grid positions (`SwinFeatures.positions()`) -> (N, 4) normalised
    [x1, y1, x2, y2] of each cell: cell (r, c) spans pixels [c * stride, (c + 1) * stride) x
    [r * stride, (r + 1) * stride) of the image (H, W) = `image_size` (cells over Swin's
    right/bottom padding reach past 1). Normalised, a cell keeps its meaning at any image size,
    which a learned table per grid index would not."""
    H, W = image_size
    rc = positions.to(torch.float32)
    x1, y1 = rc[:, 1] * stride / W, rc[:, 0] * stride / H
    return torch.stack([x1, y1, x1 + stride / W, y1 + stride / H], dim=1)


class RegionEmbed(nn.Module):
    """Region feature + box -> one visual token (UNITER's ImageEmbeddings, without dropout).

    LayerNorm(Linear(standardised feature)) + LayerNorm(Linear(box_geometry(box))), then a
    final LayerNorm. Token-type and position embeddings are added by the caller (e.g.
    BertEmbed's inputs_embeds).

    The raw features are first standardised per region (`feature_in`, a LayerNorm over the
    feature dims): detector and thumbnail features are non-negative with a large common
    offset, and projected as they are, every region starts out as nearly the same token. On the
    shapes world without it, masked colour/shape words were no better predicted with the
    regions than without them after 250 steps; with it, 61% vs 19% (bench/README.md).
    """

    def __init__(self, feature_dim: int, width: int, norm_eps: float = 1e-12):
        super().__init__()
        self.feature_in = nn.LayerNorm(feature_dim, eps=1e-5)
        self.feature_proj = nn.Linear(feature_dim, width)
        self.feature_norm = nn.LayerNorm(width, eps=norm_eps)
        self.box_proj = nn.Linear(7, width)
        self.box_norm = nn.LayerNorm(width, eps=norm_eps)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        for lin in (self.feature_proj, self.box_proj):  # BERT's init (initializer_range 0.02)
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """features (B, R, feature_dim), boxes (B, R, 4) normalised -> (B, R, width)."""
        x = self.feature_norm(self.feature_proj(self.feature_in(features)))  # (B, R, width)
        geometry = box_geometry(boxes).to(x.dtype)  # (B, R, 7)
        return self.norm(x + self.box_norm(self.box_proj(geometry)))  # (B, R, width)


class RoIRegionFeatures(nn.Module):
    """Pool one vector per box from a grid feature map (no parameters).

    feature_map (B, C, Hg, Wg), e.g. ViT patch tokens without the class token reshaped as
    `tokens.transpose(1, 2).reshape(B, C, Hg, Wg)`, or a Swin stage's map
    (`SwinFeatures.feature_map(s)`); boxes (B, R, 4) [x1, y1, x2, y2] normalised to [0, 1] of
    the image; mask (B, R) bool, False for padding. Each box is roi-aligned (aligned=True) to
    `output_size` cells whose mean is its vector. Returns (B, R, C); padded regions are zeros.

    Where the grid covers exactly the image (a ViT: grid * patch = image), a normalised box
    times the grid size is in feature-map coordinates (cell i spans [i, i+1]): spatial_scale=1.
    A Swin map covers the image padded up to its stride (right/bottom), so its cells are not
    image / grid wide: give `stride` (the stage's pixels per cell) and `image_size` (H, W of
    the pixels the tokens came from); the boxes then go in pixels with spatial_scale = 1/stride,
    as a detector's FPN level is pooled.
    """

    def __init__(self, output_size: int | tuple[int, int] = (2, 2), sampling_ratio: int = 2):
        super().__init__()
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio

    def forward(self, feature_map: torch.Tensor, boxes: torch.Tensor,
                mask: torch.Tensor | None = None, *, stride: int | None = None,
                image_size: tuple[int, int] | None = None) -> torch.Tensor:
        B, C, Hg, Wg = feature_map.shape
        if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[2] != 4:
            raise ValueError(f"boxes must be (B={B}, R, 4) normalised [x1, y1, x2, y2], got "
                             f"shape {tuple(boxes.shape)}")
        if (stride is None) != (image_size is None):
            raise ValueError("give both stride and image_size (a map over a padded image), or "
                             "neither (a grid that covers the image exactly)")
        R = boxes.shape[1]
        boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))  # bf16 boxes: no rounding
        if stride is None:  # x by the grid's width, y by its height
            scale, spatial_scale = boxes.new_tensor([Wg, Hg, Wg, Hg]), 1.0
        else:  # to pixels, then 1 / stride into the map
            H, W = image_size
            scale, spatial_scale = boxes.new_tensor([W, H, W, H]), 1.0 / stride
        batch = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(R)
        rois = torch.cat([batch[:, None], (boxes * scale).reshape(B * R, 4)], dim=1)  # (B*R, 5)
        # every box is pooled (padding too: a fixed shape, no host sync), then padding zeroed
        pooled = roi_align(feature_map, rois, self.output_size, spatial_scale=spatial_scale,
                           sampling_ratio=self.sampling_ratio, aligned=True)  # (B*R, C, oh, ow)
        pooled = pooled.mean(dim=(2, 3)).reshape(B, R, C)  # (B, R, C)
        if mask is not None:
            pooled = torch.where(mask[..., None].to(torch.bool), pooled,
                                 torch.zeros_like(pooled))
        return pooled
