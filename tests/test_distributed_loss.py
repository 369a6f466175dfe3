"""2 gloo ranks x batch B give the same contrastive loss and gradients as 1 process x batch 2B
on the same samples (features gathered with gradients, local-loss form)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp.objectives import clip_loss, distributed_clip_loss

B, D_IN, D = 4, 6, 5


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D), torch.nn.Linear(D_IN, D), torch.nn.Parameter(torch.tensor(2.0))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, D_IN, generator=g), torch.randn(2 * B, D_IN, generator=g)


def _loss(img_enc, txt_enc, scale, x_img, x_txt, fn):
    img = F.normalize(img_enc(x_img), dim=-1)
    txt = F.normalize(txt_enc(x_txt), dim=-1)
    return fn(img, txt, scale.exp())["contrastive_loss"]


def _worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    img_enc, txt_enc, scale = _model()
    x_img, x_txt = _data()
    rows = slice(rank * B, (rank + 1) * B)
    loss = _loss(img_enc, txt_enc, scale, x_img[rows], x_txt[rows], distributed_clip_loss)
    loss.backward()
    params = [*img_enc.parameters(), *txt_enc.parameters(), scale]
    for p in params:  # what DDP / DeepSpeed do with gradients: average over ranks
        dist.all_reduce(p.grad)
        p.grad /= 2
    total = loss.detach().clone()
    dist.all_reduce(total)
    out[rank] = {"loss": total / 2, "grads": [p.grad.clone() for p in params]}
    dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    img_enc, txt_enc, scale = _model()
    x_img, x_txt = _data()
    ref = _loss(img_enc, txt_enc, scale, x_img, x_txt, clip_loss)
    ref.backward()
    ref_grads = [p.grad for p in (*img_enc.parameters(), *txt_enc.parameters(), scale)]

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    for rank in (0, 1):
        # float32 sums in a different order: agreement to 1e-6 (tolerance stated here)
        torch.testing.assert_close(out[rank]["loss"], ref.detach(), atol=1e-6, rtol=1e-6)
        for got, want in zip(out[rank]["grads"], ref_grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
