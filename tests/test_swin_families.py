"""A Swin image tower in every family (issue 13 part 2): the single stream's visual tokens are
the final grid with its cells' boxes; RoIAlign over a chosen stage equals the mean of that
stage's cells (worked by hand) and roi_align over the hand-reshaped tokens at 1/stride; the
combined model fuses the final-stage tokens and pools their mean; the joint encoder grounds
objects from the chosen stage and its cached visual tokens equal the raw path; pretraining runs
(combined, single-stream patches and roi_align), VQA and caption fine-tuning from a Swin dual
tower, region extraction, retrieval embedding, and the to-hf-clip refusal.

Images are 60 px in patches of 4, so every stage is padded: grids 15x15 (stride 4), 8x8
(stride 8, 7.5 cells of image), 4x4 (stride 16). A pooling that scaled boxes by the grid
instead of 1/stride would read the wrong cells.
"""
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlp
from vlp.cli import main
from vlp.config import ConfigError, FusionConfig, ModelConfig, TextConfig, VisionConfig, \
    load_config, to_dict
from vlp.models.combined import Combined
from vlp.models.joint import JointEncoder
from vlp.models.regions import grid_cell_boxes, roi_align
from vlp.models.single_stream import SingleStream

SIZE = 60  # not a multiple of the strides 8 and 16: every stage after the first is padded
GRIDS = [(15, 15), (8, 8), (4, 4)]
STRIDES = [4, 8, 16]
SWIN = dict(arch="swin", image_size=SIZE, patch_size=4, width=16, stage_depths=(2, 1, 1),
            stage_heads=(1, 2, 2), window_size=4, pool="mean")  # widths 16, 32, 64
SWIN_YAML = ("model:\n  embed_dim: 32\n  vision: {arch: swin, image_size: 60, patch_size: 4, "
             "width: 16, stage_depths: [2, 1, 1], stage_heads: [1, 2, 2], window_size: 4, "
             "pool: mean}\n  text: {width: 32, layers: 1, heads: 2}\n"
             "  fusion: {width: 32, layers: 1, heads: 2}\n  max_regions: 8\n")
PRETRAIN = ["--no-progress", "data.val=", "eval.at_end=false", "train.steps=3",
            "train.batch_size=8", "train.save_every=0", "train.log_every=1", "train.threads=1",
            "data.num_workers=0", "tokenizer.vocab_size=200"]


def _cfg(kind="patches", **vision) -> ModelConfig:
    return ModelConfig(embed_dim=32, vision=VisionConfig(**{**SWIN, **vision}),
                       text=TextConfig(width=32, layers=1, heads=2, mask="bidirectional",
                                       pool="cls"),
                       fusion=FusionConfig(width=32, layers=1, heads=2), visual_tokens=kind,
                       max_regions=8)


def _cell_mean(tokens, grid, rows, cols):
    """Mean of the tokens (B, H*W, C), row-major on `grid`, in rows x cols: by index."""
    index = [r * grid[1] + c for r in rows for c in cols]
    return tokens[:, index].mean(dim=1)


def _pixels(n=2, seed=0):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ config
def test_config_takes_swin_everywhere_and_checks_roi_stage(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWIN_YAML)
    for recipe in ("single_stream", "combined", "dual_tower"):
        cfg = load_config(path, [f"recipe={recipe}", "model.text.mask=bidirectional"])
        assert cfg.model.vision.arch == "swin" and cfg.model.vision.roi_stage == -1
    assert load_config(path, ["model.vision.roi_stage=-3"]).model.vision.roi_stage == -3
    for bad in ("3", "-4"):
        with pytest.raises(ConfigError, match=f"roi_stage={bad} is not a stage of this "
                                              r"3-stage Swin: use 0..2, or -1 for the last"):
            load_config(path, [f"model.vision.roi_stage={bad}"])
    with pytest.raises(ConfigError, match="roi_stage=1 is Swin's"):
        load_config(None, ["model.vision.roi_stage=1"])  # a ViT has one grid


# ------------------------------------------------------------------ single stream: patches
def test_single_stream_visual_tokens_are_the_final_grid_with_cell_boxes():
    torch.manual_seed(0)
    m = SingleStream(_cfg("patches"), 100, heads=("mlm", "itm")).eval()
    px = _pixels()
    with torch.no_grad():
        stages = m.swin_features(px)
        assert stages.stage_grids == GRIDS and stages.strides == STRIDES
        assert stages.grid == (4, 4) and stages.tokens.shape == (2, 16, 64)
        # each token's box is its cell of the padded image, normalised to the 60-px image: by
        # hand, token k = (row k // 4, col k % 4), centre ((col + .5) * 16, (row + .5) * 16) px
        boxes = torch.tensor([[c * 16 / SIZE, r * 16 / SIZE, (c + 1) * 16 / SIZE,
                               (r + 1) * 16 / SIZE] for r in range(4) for c in range(4)])
        cells = grid_cell_boxes(stages.positions(), 16, (SIZE, SIZE))
        torch.testing.assert_close(cells, boxes, rtol=0, atol=1e-7)
        centres = torch.tensor([[(c + 0.5) * 16, (r + 0.5) * 16] for r in range(4)
                                for c in range(4)]) / SIZE
        torch.testing.assert_close((cells[:, :2] + cells[:, 2:]) / 2, centres, rtol=0,
                                   atol=1e-7)
        # the visual tokens: UNITER's region embedding of each final token with its cell,
        # then segment 1 and the visual norm, built here from the hand-made boxes
        segment = m.text_embed.type_embed.weight[1]
        expected = m.visual_norm(m.grid_embed(stages.tokens, boxes.expand(2, -1, -1)) + segment)
        visual, mask = m.embed_visual(None, None, None, px)
        torch.testing.assert_close(visual, expected, rtol=0, atol=1e-6)
        assert mask.shape == (2, 16) and bool(mask.all())
        # the positions matter: the same tokens with their cells reversed embed differently
        moved = m.visual_norm(m.grid_embed(stages.tokens, boxes.flip(0).expand(2, -1, -1))
                              + segment)
        assert (moved - visual).abs().max() > 1e-2
        # [CLS] w.. [SEP] | 16 grid tokens | [END] through the stream
        ids = torch.randint(5, 100, (2, 7))
        hidden, _ = m.hidden_states(ids, torch.ones_like(ids), pixel_values=px)
        assert hidden.shape == (2, 7 + 16 + 1, 32)


def test_single_stream_swin_trains_the_trunk_through_the_stream():
    """ITM's loss reaches the Swin trunk's first stage and the cells' box projection."""
    torch.manual_seed(0)
    m = SingleStream(_cfg("patches"), 100, heads=("itm",))
    ids = torch.randint(5, 100, (2, 7))
    out = m(ids, torch.ones_like(ids), task="itm", pixel_values=_pixels())
    F.cross_entropy(out["itm_logits"], torch.tensor([0, 1])).backward()
    assert m.swin.embed.proj.weight.grad.abs().sum() > 0
    assert m.swin.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.grid_embed.box_proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ RoIAlign over a stage
@pytest.mark.parametrize("roi_stage, stage", [(1, 1), (-1, 2), (0, 0)])
def test_roi_align_over_the_chosen_stage_equals_its_cells_by_hand(roi_stage, stage):
    """A box spanning 4x4 cells of stage s (pixels [c0 * stride, (c0 + 4) * stride]) pooled
    to 2x2 bins of 2x2 samples (aligned): the 16 samples fall exactly on the 16 cell centres,
    so the region's vector is the mean of those cells' tokens, read by index."""
    torch.manual_seed(0)
    m = SingleStream(_cfg("roi_align", roi_stage=roi_stage), 100, heads=("mlm",)).eval()
    assert m.region_feature_dim == 16 * 2 ** stage
    stride, grid = STRIDES[stage], GRIDS[stage]
    r0, c0 = (1, 2) if stage < 2 else (0, 0)
    box = torch.tensor([c0, r0, c0 + 4, r0 + 4], dtype=torch.float32) * stride / SIZE
    other = torch.tensor([0.1, 0.2, 0.7, 0.9])  # any box: against roi_align below
    boxes = torch.stack([box, other])[None].expand(2, -1, -1)
    mask = torch.tensor([[True, True], [True, False]])
    px = _pixels()
    with torch.no_grad():
        pooled, _, _ = m.region_inputs(px, None, boxes, mask)
        tokens = m.swin_features(px).stage_tokens[stage]  # (B, H*W, C) before merging
    assert pooled.shape == (2, 2, m.region_feature_dim)
    expected = _cell_mean(tokens, grid, range(r0, r0 + 4), range(c0, c0 + 4))
    torch.testing.assert_close(pooled[:, 0], expected, rtol=0, atol=1e-5)
    # any box: roi_align over the tokens reshaped here, boxes in pixels at 1/stride
    fmap = tokens.view(2, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (B, C, H, W)
    rois = torch.tensor([[0, *(other * SIZE).tolist()]])
    ref = roi_align(fmap[:1], rois, (2, 2), spatial_scale=1 / stride, sampling_ratio=2,
                    aligned=True).mean(dim=(2, 3))
    torch.testing.assert_close(pooled[0, 1], ref[0], rtol=0, atol=1e-6)
    assert float(pooled[1, 1].abs().max()) == 0.0  # padding
    if stage:  # the padded map: scaling boxes by the grid would read other cells
        by_grid = m.roi_pool(m.swin_features(px).feature_map(stage), boxes, mask)
        assert (by_grid[:, 0] - expected).abs().max() > 1e-3


# ------------------------------------------------------------------ combined and joint
def test_combined_fuses_the_final_tokens_and_pools_their_mean():
    torch.manual_seed(0)
    model = Combined(_cfg("patches"), 100).eval()
    assert tuple(model.image_proj.weight.shape) == (32, 64)  # the last stage's width -> fusion
    px = _pixels()
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        tokens = model.towers.visual.forward_features(px)
        assert tokens.shape == (2, 16, 64)
        out = model(px, ids, mask)
        mean = model.towers.visual.proj(tokens.mean(dim=1))  # Swin's average pool
        torch.testing.assert_close(out["image_features"], F.normalize(mean, dim=-1), rtol=0,
                                   atol=1e-6)
    # ITM and MLM gradients reach the trunk through the fusion layers (not only through ITC)
    model.train()
    text = model.towers.text.forward_features(ids, mask)
    image = model.towers.visual.forward_features(px)
    model.itm_logits(text, mask, image).sum().backward()
    assert model.towers.visual.swin.stages[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.towers.visual.proj.weight.grad is None  # ITM does not use the pooled path


@pytest.mark.parametrize("architecture, kind", [("dual_tower", "pixels"),
                                                ("combined", "pixels"),
                                                ("single_stream", "patches"),
                                                ("single_stream", "roi_align")])
def test_joint_encoder_visual_cache_equals_the_raw_path(architecture, kind):
    """What captioning decodes with (encode_visual once, then forward on its tokens) equals
    forward on the raw pixels, for every Swin backbone; and the cached tokens' shapes."""
    torch.manual_seed(0)
    cfg = _cfg(kind if kind != "pixels" else "patches", roi_stage=1)
    spec = {"architecture": architecture, "model": to_dict(cfg),
            "fusion": to_dict(FusionConfig(width=0, layers=1, heads=2))}
    encoder = JointEncoder(spec, 100).eval()
    px = _pixels()
    visual = {"pixel_values": px}
    if kind == "roi_align":
        visual.update(region_boxes=torch.tensor([[[0.1, 0.1, 0.6, 0.5]] * 3] * 2),
                      region_mask=torch.ones(2, 3, dtype=torch.bool))
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = encoder.encode_visual(visual)
        for causal in (False, True):
            torch.testing.assert_close(encoder(ids, mask, cached, causal_text=causal),
                                       encoder(ids, mask, visual, causal_text=causal),
                                       rtol=0, atol=1e-5)
    if architecture == "single_stream":
        n = 16 if kind == "patches" else 3
        assert cached["visual_tokens"].shape == (2, n, 32)
    else:
        assert cached["image_tokens"].shape == (2, 16, 64)


@pytest.mark.parametrize("architecture", ["dual_tower", "single_stream"])
def test_grounded_objects_pool_the_chosen_stage(architecture):
    """VCR / RefCOCO grounding with a Swin tower: an object's embedding is ground_proj of its
    box pooled from stage roi_stage (here the 8x8 stride-8 one), and reaches the words."""
    torch.manual_seed(0)
    cfg = _cfg("patches", roi_stage=1)
    spec = {"architecture": architecture, "model": to_dict(cfg),
            "fusion": to_dict(FusionConfig(width=0, layers=1, heads=2))}
    encoder = JointEncoder(spec, 100).eval()
    px = _pixels()
    box = torch.tensor([2, 1, 6, 5], dtype=torch.float32) * 8 / SIZE  # cells c 2..5, r 1..4
    boxes = torch.stack([box, torch.tensor([0.0, 0.0, 0.5, 0.5])])[None].expand(2, -1, -1)
    trunk = encoder.core.swin if architecture == "single_stream" else \
        encoder.core.towers.visual.swin
    with torch.no_grad():
        stages = trunk.forward_stages(px)
        objects = encoder.object_features(stages, (SIZE, SIZE), boxes)
        expected = encoder.ground_proj(_cell_mean(stages.stage_tokens[1], (8, 8), range(1, 5),
                                                  range(2, 6)))
        torch.testing.assert_close(objects[:, 0], expected, rtol=0, atol=1e-5)
        ids = torch.randint(5, 100, (2, 7))
        mask = torch.ones_like(ids)
        none = torch.full_like(ids, -1)
        first, second = none.clone(), none.clone()
        first[:, 3], second[:, 3] = 0, 1

        def run(objects_):
            return encoder(ids, mask, {"pixel_values": px}, token_objects=objects_,
                           object_boxes=boxes, object_mask=None)

        h_none, h0, h1 = run(none), run(first), run(second)
        torch.testing.assert_close(h_none, encoder(ids, mask, {"pixel_values": px}), rtol=0,
                                   atol=1e-6)
        assert (h0 - h_none).abs().max() > 1e-4 and (h0[:, 3] - h1[:, 3]).abs().max() > 1e-4


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def swin_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("swin_cfg") / "swin.yaml"
    path.write_text(SWIN_YAML)
    return path


@pytest.fixture(scope="module")
def swin_dual_tower(ft_world, swin_yaml, tmp_path_factory):
    """A Swin dual tower from a 3-step pretraining run on the fine-tuning shapes world."""
    out = tmp_path_factory.mktemp("swin_dual")
    assert main(["pretrain", "--config", str(swin_yaml), "--out", str(out),
                 f"data.train={ft_world}/train", *PRETRAIN]) == 0
    return out / "model"


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe, extra", [
    ("combined", ["model.text.mask=bidirectional", "model.text.pool=cls"]),
    ("single_stream", ["model.visual_tokens=patches"]),
    ("single_stream", ["model.visual_tokens=roi_align", "model.vision.roi_stage=1"]),
])
def test_pretraining_recipes_with_a_swin_tower(ft_world, swin_yaml, tmp_path, recipe, extra):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(swin_yaml), "--out", str(out),
                 f"data.train={ft_world}/train", f"recipe={recipe}", *extra, *PRETRAIN]) == 0
    steps = [r for r in _log(out) if "loss" in r and "step" in r]
    assert [r["step"] for r in steps][-1] == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # the directory loads strictly into the joint encoder it describes, Swin inside
    encoder, tokenizer, transform = JointEncoder.from_pretrained(out / "model")
    assert encoder.cfg.vision.arch == "swin" and transform.image_size == SIZE
    px = _pixels(1)
    visual = {"pixel_values": px}
    if "model.visual_tokens=roi_align" in extra:
        assert encoder.core.region_feature_dim == 32  # stage 1's width
        assert all(torch.isfinite(torch.tensor(r["mrfr_loss"])) for r in steps)
        visual.update(region_boxes=torch.tensor([[[0.1, 0.1, 0.6, 0.5]]]),
                      region_mask=torch.ones(1, 1, dtype=torch.bool))
    with torch.no_grad():
        cached = encoder.encode_visual(visual)
    if recipe == "combined":
        assert cached["image_tokens"].shape == (1, 16, 64)
        model = vlp.load(out / "model")  # as a dual tower: the pooled mean, projected
        towers = encoder.core.towers.eval()
        with torch.no_grad():
            mean = towers.visual.proj(towers.visual.forward_features(px).mean(dim=1))
        torch.testing.assert_close(model.encode_image(px), F.normalize(mean, dim=-1),
                                   rtol=0, atol=1e-5)
    else:
        n = 16 if "model.visual_tokens=patches" in extra else 1
        assert cached["visual_tokens"].shape == (1, n, 32)


FT = ["train.steps=3", "train.threads=1", "train.batch_size=8", "train.save_every=0",
      "train.log_every=1", "data.num_workers=0"]


def test_vqa_finetune_from_a_swin_dual_tower(ft_world, swin_dual_tower, tmp_path):
    out = tmp_path / "vqa"
    assert main(["finetune", "vqa", "--out", str(out), "--no-progress",
                 f"init_from={swin_dual_tower}", f"data.synth_dir={ft_world}", *FT,
                 "eval.batch_size=32", "eval.split=val"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["vqa_acc"] <= 100.0 and metrics["train_steps"] == 3
    model = vlp.load(out / "model")
    assert model.model.backbone.cfg.vision.arch == "swin"
    results = json.loads((out / "vqa_val_results.json").read_text())
    q = json.loads((ft_world / "benchmarks" / "vqa" /
                    "v2_OpenEnded_mscoco_val_questions.json").read_text())["questions"][0]
    image = ft_world / "benchmarks" / "images" / f"{q['image_id']:012d}.jpg"
    assert model.answer(image, q["question"]) == next(
        r["answer"] for r in results if r["question_id"] == q["question_id"])


def test_caption_finetune_from_a_swin_dual_tower(ft_world, swin_dual_tower, tmp_path):
    out = tmp_path / "caption"
    assert main(["finetune", "caption", "--out", str(out), "--no-progress",
                 f"init_from={swin_dual_tower}", f"data.synth_dir={ft_world}", *FT,
                 "eval.at_end=false", "caption.max_length=12", "caption.beam_size=2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 3
    model = vlp.load(out / "model")
    bench = ft_world / "benchmarks"
    test = [im for im in json.loads((bench / "coco" / "dataset_coco.json").read_text())["images"]
            if im["split"] == "test"][:3]
    paths = [bench / im["filepath"] / im["filename"] for im in test]
    captions = model.captions(paths)
    assert len(captions) == 3 and all(isinstance(c, str) and c.strip() for c in captions)
    assert captions[0] == model.caption(paths[0])


def test_extract_regions_pools_the_swin_stage(swin_dual_tower):
    from vlp.extract_regions import RegionExtractor

    extractor = RegionExtractor(swin_dual_tower, device="cpu")
    assert extractor.stage == 2 and extractor.dim == 64  # roi_stage -1: the last, width 64
    image = Image.fromarray((torch.rand(SIZE, SIZE, 3) * 255).byte().numpy())
    box = torch.tensor([8.0, 4.0, 40.0, 52.0])
    (feats, keep), = extractor.features([image], [box[None].numpy()])
    assert feats.shape == (1, 64) and keep.tolist() == [True]
    visual = extractor.visual
    with torch.no_grad():
        tokens = visual.forward_stages(extractor.transform(image)[None]).stage_tokens[2]
    fmap = tokens.view(1, 4, 4, 64).permute(0, 3, 1, 2)
    ref = roi_align(fmap, torch.cat([torch.zeros(1), box])[None], (2, 2), spatial_scale=1 / 16,
                    sampling_ratio=2, aligned=True).mean(dim=(2, 3))
    torch.testing.assert_close(torch.from_numpy(feats), ref, rtol=0, atol=1e-5)


def test_retrieval_embeds_through_the_swin_tower(ft_world, swin_dual_tower, tmp_path):
    from vlp.retrieval import Searcher
    from vlp.retrieval.embed import embed_corpus
    from vlp.retrieval.index import build_index

    shard = sorted((ft_world / "val").glob("*.tar"))[0]
    out = tmp_path / "index"
    embed_corpus(swin_dual_tower, str(shard), out, progress=False)
    build_index(out, index_type="flat", progress=False)
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        key = member.name.rsplit(".", 1)[0]
        path = tmp_path / "q.jpg"
        path.write_bytes(tar.extractfile(member).read())
    with Image.open(path) as im:
        hits = Searcher(out).search_image(im.convert("RGB"), k=3)
    assert hits[0].key == key and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_to_hf_clip_refuses_swin_in_one_line(swin_dual_tower, tmp_path, capsys):
    assert main(["convert", "to-hf-clip", str(swin_dual_tower), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "model.vision.arch='swin' cannot be written as a CLIPModel" in err
    assert "no Swin tower" in err
