import math

import numpy as np
import torch

from vlp.objectives import clip_loss


def _hand_infonce(img, txt, scale):
    """Symmetric InfoNCE written from the formula with numpy, one row at a time."""
    img, txt = np.asarray(img, dtype=np.float64), np.asarray(txt, dtype=np.float64)
    n = len(img)
    sim = scale * img @ txt.T
    i2t = -np.mean([sim[i, i] - math.log(np.exp(sim[i]).sum()) for i in range(n)])
    t2i = -np.mean([sim[i, i] - math.log(np.exp(sim[:, i]).sum()) for i in range(n)])
    return (i2t + t2i) / 2


def test_clip_loss_matches_hand_formula():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    got = clip_loss(img, txt, torch.tensor(10.0))["contrastive_loss"]
    assert abs(float(got) - _hand_infonce(img, txt, 10.0)) < 1e-5


def test_tiny_worked_example():
    # 2x2 with unit vectors: sim = [[1, 0], [0, 1]] * s; each CE = log(1 + e^-s)
    img = torch.eye(2)
    txt = torch.eye(2)
    s = 2.0
    got = float(clip_loss(img, txt, torch.tensor(s))["contrastive_loss"])
    assert abs(got - math.log(1 + math.exp(-s))) < 1e-6


def test_gathered_features_local_loss_semantics():
    """Two 'ranks' with local rows against gathered columns average to the full-batch loss."""
    torch.manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    full = clip_loss(img, txt, torch.tensor(5.0))["contrastive_loss"]
    parts = [clip_loss(img[r * 3:(r + 1) * 3], txt[r * 3:(r + 1) * 3], torch.tensor(5.0),
                       all_image_features=img, all_text_features=txt,
                       offset=r * 3)["contrastive_loss"] for r in range(2)]
    torch.testing.assert_close(sum(parts) / 2, full)
