import numpy as np
import pytest
import torch

from vlp.eval.retrieval import chance_levels, recall_at_k


def _brute_force(sim: np.ndarray, txt2img: np.ndarray, k: int):
    n_img, n_txt = sim.shape
    i2t = 0
    for i in range(n_img):
        top = np.argsort(-sim[i], kind="stable")[:k]
        i2t += any(txt2img[t] == i for t in top)
    t2i = 0
    for t in range(n_txt):
        top = np.argsort(-sim[:, t], kind="stable")[:k]
        t2i += txt2img[t] in top
    return 100 * i2t / n_img, 100 * t2i / n_txt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_img = 40
    txt2img = np.repeat(np.arange(n_img), 5)
    rng.shuffle(txt2img)
    img = rng.normal(size=(n_img, 8))
    txt = img[txt2img] + rng.normal(scale=1.5, size=(len(txt2img), 8))  # noisy, so ranks vary
    sim = img @ txt.T
    got = recall_at_k(torch.tensor(sim), torch.tensor(txt2img), ks=(1, 5, 10))
    for k in (1, 5, 10):
        i2t, t2i = _brute_force(sim, txt2img, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
    assert 0 < got["i2t_R@1"] < 100 and 0 < got["t2i_R@1"] < 100


def test_perfect_and_chance():
    txt2img = torch.arange(4).repeat_interleave(2)
    sim = (torch.arange(4)[:, None] == txt2img[None]).float()
    got = recall_at_k(sim, txt2img)
    assert got["i2t_R@1"] == 100 and got["t2i_R@1"] == 100
    c = chance_levels({"num_images": 1000, "num_texts": 5000})
    assert c["t2i_R@1"] == pytest.approx(0.1)
    assert c["i2t_R@1"] == pytest.approx(0.1)  # 5 positives among 5000 texts
