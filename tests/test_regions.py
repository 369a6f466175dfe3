import math

import pytest
import torch
from torch import nn

from vlp.models.regions import RegionEmbed, RoIRegionFeatures, box_geometry, roi_align


def ramp_map() -> torch.Tensor:
    """1x1x4x4 float64 map with f[y][x] = 4*y + x (all values distinct):
         x=0  1  2  3
    y=0     0  1  2  3
    y=1     4  5  6  7
    y=2     8  9 10 11
    y=3    12 13 14 15
    Every coordinate below is a dyadic fraction, so float64 arithmetic is exact in any order.
    """
    return torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)


def reference_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Scalar transcription of torchvision's CPU kernel (roi_align_forward_kernel_impl +
    bilinear_interpolate), one sample at a time: the independent check of the vectorised code."""
    oh, ow = output_size
    _, C, H, W = features.shape
    out = torch.zeros(len(rois), C, oh, ow, dtype=torch.float64)

    def bilinear(img, y, x):  # img (H, W)
        if y < -1.0 or y > H or x < -1.0 or x > W:
            return 0.0
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= H - 1:
            y_high = y_low = H - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= W - 1:
            x_high = x_low = W - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        return (hy * hx * img[y_low][x_low] + hy * lx * img[y_low][x_high]
                + ly * hx * img[y_high][x_low] + ly * lx * img[y_high][x_high])

    for k, (b, *box) in enumerate(rois.tolist()):
        off = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (v * spatial_scale - off for v in box)
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        for c in range(C):
            img = features[int(b), c].tolist()
            for ph in range(oh):
                for pw in range(ow):
                    acc = 0.0
                    for iy in range(sampling_ratio):
                        y = y1 + ph * bh + (iy + 0.5) * bh / sampling_ratio
                        for ix in range(sampling_ratio):
                            x = x1 + pw * bw + (ix + 0.5) * bw / sampling_ratio
                            acc += bilinear(img, y, x)
                    out[k, c, ph, pw] = acc / sampling_ratio ** 2
    return out


def roi(b, x1, y1, x2, y2):
    return torch.tensor([[b, x1, y1, x2, y2]], dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed bilinear cases


def test_aligned_single_sample_interior_by_hand():
    f = ramp_map()
    # aligned: box shifted by -0.5 -> x 1.5..3.5, y 0.75..1.75; size 2 x 1; one bin, one sample
    # at the centre: x = 1.5 + 0.5*2 = 2.5, y = 0.75 + 0.5*1 = 1.25.
    # x_low=2, lx=.5; y_low=1, ly=.25:
    #   .75*.5*f[1][2] + .75*.5*f[1][3] + .25*.5*f[2][2] + .25*.5*f[2][3]
    # = .375*6 + .375*7 + .125*10 + .125*11 = 2.25 + 2.625 + 1.25 + 1.375 = 7.5
    out = roi_align(f, roi(0, 2.0, 1.25, 4.0, 2.25), 1, sampling_ratio=1, aligned=True)
    assert out.shape == (1, 1, 1, 1)
    assert torch.equal(out, torch.tensor([[[[7.5]]]], dtype=torch.float64))
    # same box in pixels of a 2x larger image, spatial_scale=0.5 -> the same samples
    out2 = roi_align(f, roi(0, 4.0, 2.5, 8.0, 4.5), 1, spatial_scale=0.5, sampling_ratio=1)
    assert torch.equal(out2, out)


def test_aligned_box_past_the_border_by_hand():
    f = ramp_map()
    # box x 1..5, y 2..6 on a 4x4 map; aligned -> x 0.5..4.5, y 1.5..5.5; size 4, output 2 ->
    # bin 2, sampling_ratio 2 -> sub-bin 1, samples at start + 2p + s + .5:
    #   x: 1, 2 | 3, 4        y: 2, 3 | 4, 5
    # border rule: x=4 (= W) is kept and clamped to column 3 (low=4 >= W-1 -> both column 3);
    # x=3 -> column 3; y=4 -> row 3; y=5 > H -> the sample is 0 (but still counted: /4).
    # bin (0,0): f[2][1] + f[2][2] + f[3][1] + f[3][2] = 9 + 10 + 13 + 14 = 46 -> 11.5
    # bin (0,1): f[2][3] + f[2][3] + f[3][3] + f[3][3] = 11 + 11 + 15 + 15 = 52 -> 13
    # bin (1,0): f[3][1] + f[3][2] + 0 + 0 = 13 + 14 = 27 -> 6.75
    # bin (1,1): f[3][3] + f[3][3] + 0 + 0 = 30 -> 7.5
    out = roi_align(f, roi(0, 1.0, 2.0, 5.0, 6.0), 2, sampling_ratio=2, aligned=True)
    assert torch.equal(out, torch.tensor([[[[11.5, 13.0], [6.75, 7.5]]]], dtype=torch.float64))


def test_unaligned_clamping_at_both_borders_by_hand():
    f = ramp_map()
    # aligned=False: no shift. box x -1..1, y 2.25..4.25: size 2 x 2, one bin, sampling_ratio 2
    # -> sub-bin 1, samples at start + .5, start + 1.5:  x: -0.5, 0.5   y: 2.75, 3.75
    # x=-0.5 is >= -1, clamped to 0 -> column 0 exactly (lx=0)
    # y=3.75: y_low=3 >= H-1 -> row 3 with weight 1 (zero padding would give .25*f[3][.])
    #   (2.75, -0.5): .25*f[2][0] + .75*f[3][0] = .25*8 + .75*12 = 2 + 9 = 11
    #   (2.75,  0.5): .25*.5*8 + .25*.5*9 + .75*.5*12 + .75*.5*13 = 1 + 1.125 + 4.5 + 4.875 = 11.5
    #   (3.75, -0.5): f[3][0] = 12
    #   (3.75,  0.5): .5*f[3][0] + .5*f[3][1] = 6 + 6.5 = 12.5
    # mean = (11 + 11.5 + 12 + 12.5) / 4 = 47 / 4 = 11.75
    out = roi_align(f, roi(0, -1.0, 2.25, 1.0, 4.25), 1, sampling_ratio=2, aligned=False)
    assert torch.equal(out, torch.tensor([[[[11.75]]]], dtype=torch.float64))


def test_unaligned_below_minus_one_is_zero_by_hand():
    f = ramp_map()
    # aligned=False, output (2, 1), sampling_ratio 1; box x 0.5..2.5, y -3..1: size 2 x 4,
    # bin 2 x 2; x sample 0.5 + 1 = 1.5; y samples -3 + 1 = -2 (bin 0), -3 + 2 + 1 = 0 (bin 1)
    # bin 0: y=-2 < -1 -> 0
    # bin 1: y=0 -> row 0, x=1.5 -> .5*f[0][1] + .5*f[0][2] = .5 + 1 = 1.5
    out = roi_align(f, roi(0, 0.5, -3.0, 2.5, 1.0), (2, 1), sampling_ratio=1, aligned=False)
    assert out.shape == (1, 1, 2, 1)
    assert torch.equal(out, torch.tensor([[[[0.0], [1.5]]]], dtype=torch.float64))


def test_degenerate_box_aligned_vs_unaligned_by_hand():
    f = ramp_map()
    box = roi(0, 1.25, 2.0, 1.25, 2.0)  # zero width and height
    # aligned=False: size forced to 1x1 -> sample at x = 1.25 + .5 = 1.75, y = 2 + .5 = 2.5
    #   x_low=1, lx=.75; y_low=2, ly=.5:
    #   .5*.25*f[2][1] + .5*.75*f[2][2] + .5*.25*f[3][1] + .5*.75*f[3][2]
    #   = .125*9 + .375*10 + .125*13 + .375*14 = 1.125 + 3.75 + 1.625 + 5.25 = 11.75
    out = roi_align(f, box, 1, sampling_ratio=1, aligned=False)
    assert torch.equal(out, torch.tensor([[[[11.75]]]], dtype=torch.float64))
    # aligned=True: size stays 0 -> every sample at the shifted corner x = .75, y = 1.5
    #   x_low=0, lx=.75; y_low=1, ly=.5:
    #   .125*f[1][0] + .375*f[1][1] + .125*f[2][0] + .375*f[2][1] = .5 + 1.875 + 1 + 3.375 = 6.75
    out = roi_align(f, box, 1, sampling_ratio=2, aligned=True)
    assert torch.equal(out, torch.tensor([[[[6.75]]]], dtype=torch.float64))


# ---------------------------------------------------------------- against the kernel, transcribed


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio,output_size", [(1, (1, 1)), (2, (2, 3)), (3, (3, 2))])
def test_matches_scalar_kernel_on_random_boxes(aligned, sampling_ratio, output_size):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)  # H=5, W=6
    K = 8
    xy1 = torch.rand(K, 2, generator=g, dtype=torch.float64) * 16 - 4  # some start off the map
    wh = torch.rand(K, 2, generator=g, dtype=torch.float64) * 10
    boxes = torch.cat([xy1, xy1 + wh], dim=1)  # pixels of a 2x image: spatial_scale .5
    boxes[0] = torch.tensor([-6.0, -6.0, -3.0, -3.0])  # entirely off the map (all samples < -1)
    boxes[1] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # degenerate
    rois = torch.cat([torch.randint(0, 2, (K, 1), generator=g).double(), boxes], dim=1)
    got = roi_align(features, rois, output_size, 0.5, sampling_ratio, aligned)
    want = reference_roi_align(features, rois, output_size, 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- gradients, batches, dtypes


def test_gradient_reaches_patch_embedding():
    torch.manual_seed(0)
    patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)  # a ViT patch embedding: 16px -> 4x4 grid
    fmap = patch(torch.randn(2, 3, 16, 16))  # (2, 8, 4, 4)
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 13.0], [1, 4.0, 0.0, 16.0, 8.0]])  # image pixels
    out = roi_align(fmap, rois, 2, spatial_scale=1 / 4)  # (2, 8, 2, 2)
    out.sum().backward()
    assert patch.weight.grad is not None and patch.weight.grad.abs().sum() > 0


def test_gradcheck_features():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 3.1, 2.9], [1, -0.8, 1.2, 4.6, 4.4],
                         [1, 2.2, 0.1, 2.9, 3.7]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f: roi_align(f, rois, (2, 2), sampling_ratio=2, aligned=True), (features,))


def test_batch_index_routing():
    g = torch.Generator().manual_seed(2)
    img0 = torch.randn(1, 2, 4, 4, generator=g)
    features = torch.cat([img0, img0 + 100.0])  # image 1 = image 0 + 100
    box = [0.6, 0.9, 3.2, 3.4]  # inside the map: the bilinear weights of every sample sum to 1
    rois = torch.tensor([[1, *box], [0, *box], [1, *box]])
    out = roi_align(features, rois, 2)
    torch.testing.assert_close(out[0], out[1] + 100.0)
    assert torch.equal(out[0], out[2])
    with pytest.raises(ValueError, match="batch indices"):
        roi_align(features, torch.tensor([[2, *box]]), 2)


def test_bf16_close_to_float32():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 6, 6, generator=g)
    rois = torch.tensor([[0, 0.5, 1.0, 5.0, 4.5], [1, -1.0, 2.0, 3.0, 7.0]])
    want = roi_align(features, rois, 2)
    got = roi_align(features.bfloat16(), rois, 2)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_no_rois_and_bad_arguments():
    features = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = roi_align(features, torch.zeros(0, 5), (2, 3))
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()  # an empty result still backpropagates (to zeros)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="sampling_ratio"):
            roi_align(features, torch.zeros(1, 5), 2, sampling_ratio=bad)
    with pytest.raises(ValueError, match="rois must be"):
        roi_align(features, torch.zeros(1, 4), 2)


# ---------------------------------------------------------------- geometry and modules


def test_box_geometry_by_hand():
    boxes = torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 1.0, 0.5]])
    # w = x2 - x1, h = y2 - y1, area = w * h: (.5, .5, .25) and (1, .5, .5)
    want = torch.tensor([[0.25, 0.5, 0.75, 1.0, 0.5, 0.5, 0.25],
                         [0.0, 0.0, 1.0, 0.5, 1.0, 0.5, 0.5]])
    assert torch.equal(box_geometry(boxes), want)
    assert box_geometry(torch.rand(2, 3, 4)).shape == (2, 3, 7)
    with pytest.raises(ValueError, match="4 coordinates"):
        box_geometry(torch.rand(2, 5))


def test_region_embed():
    torch.manual_seed(0)
    embed = RegionEmbed(feature_dim=6, width=8)
    for lin in (embed.feature_proj, embed.box_proj):
        assert torch.equal(lin.bias, torch.zeros(8)) and lin.weight.std() < 0.1
    features = torch.randn(2, 3, 6)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.1, 0.9, 0.6], [0.5, 0.5, 1.0, 1.0]])
    boxes = boxes.expand(2, 3, 4).clone()
    out = embed(features, boxes)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)  # final LN
    moved = boxes.clone()
    moved[1, 2] = torch.tensor([0.1, 0.1, 0.4, 0.3])
    out2 = embed(features, moved)
    assert not torch.allclose(out2[1, 2], out[1, 2])  # the moved box's token changes ...
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.equal(out2[mask], out[mask])  # ... and no other token does


def test_roi_region_features():
    g = torch.Generator().manual_seed(4)
    fmap = torch.randn(2, 5, 3, 6, generator=g)  # a non-square grid: Hg=3, Wg=6
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 0.0, 0.0]],
                          [[0.25, 0.3, 0.8, 0.7], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = RoIRegionFeatures()(fmap, boxes, mask)
    assert out.shape == (2, 3, 5)
    assert torch.equal(out[~mask], torch.zeros(3, 5))
    # region (1, 0) in grid coordinates: x by Wg=6, y by Hg=3
    direct = roi_align(fmap, torch.tensor([[1, 0.25 * 6, 0.3 * 3, 0.8 * 6, 0.7 * 3]]), (2, 2),
                       spatial_scale=1.0, sampling_ratio=2, aligned=True)  # (1, 5, 2, 2)
    torch.testing.assert_close(out[1, 0], direct.mean(dim=(2, 3))[0], rtol=1e-6, atol=1e-6)
    # the whole-image box with output 3x6 samples every cell centre once: the grid's mean
    image = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(2, 1, 4)
    whole = RoIRegionFeatures(output_size=(3, 6), sampling_ratio=1)(fmap, image)
    torch.testing.assert_close(whole[:, 0], fmap.mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    assert not math.isnan(out.sum().item())
