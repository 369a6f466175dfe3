"""Key/value cache for caption decoding: the one Transformer fed one token at a time equals its
full causal pass; the joint encoder's cached steps equal its prefix-LM forward on every backbone
kind; cached greedy and beam search write exactly the uncached captions (a batch of images,
captions of different lengths), each step encoding one word."""
import pytest
import torch

from vlp.config import ModelConfig, to_dict
from vlp.models.encoder import KVCache, Transformer
from vlp.models.heads.caption import CachedStep, CaptionHead, beam_search, greedy_search
from vlp.models.joint import FinetunedModel, JointEncoder
from vlp.tasks.caption import caption_step, generate

PAD, BOS, EOS, MASK = 0, 1, 2, 3
KINDS = ["regions", "regions_post_ln", "patches", "combined", "dual_tower", "dual_tower_bert"]


# ---------------------------------------------------------------------------- the Transformer
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_token_by_token_is_the_causal_pass(norm_first):
    torch.manual_seed(0)
    model = Transformer(32, 3, 4, norm_first=norm_first).eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        full = model(x, is_causal=True)  # (3, 7, 32)
        cache = KVCache(3)
        # a prefix of 3 at once (is_causal is exact on an empty cache), then one at a time
        steps = [model(x[:, :3], is_causal=True, cache=cache)]
        assert len(cache) == 3
        steps += [model(x[:, i:i + 1], cache=cache) for i in range(3, 7)]
        assert len(cache) == 7
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        # rows reordered and repeated: the cache follows them
        cache = KVCache(3)
        model(x[:, :4], is_causal=True, cache=cache)
        index = torch.tensor([2, 0, 0])
        cache.select(index)
        last = model(x[index, 4:5], cache=cache)
        assert torch.allclose(last[:, 0], full[index, 4], atol=1e-5)
        # an explicit mask over cached + new keys: hiding cached key 1 changes the result
        # exactly as hiding it in the full pass does
        cache = KVCache(3)
        model(x[:, :4], is_causal=True, cache=cache)
        mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
        mask[..., 1] = False
        full_mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].clone()
        full_mask[..., 4, 1] = False
        with_hidden = model(x[:, 4:5], mask, cache=cache)
        # rows 0..3 of the full pass keep key 1; row 4 of both passes does not see it
        reference = model(x[:, :5], full_mask[..., :5, :5])
        assert torch.allclose(with_hidden[:, 0], reference[:, 4], atol=1e-5)
        assert not torch.allclose(with_hidden[:, 0], full[:, 4], atol=1e-4)


def test_transformer_cache_in_bf16_and_misuse():
    """bf16 on CPU takes the written-out attention (attention_math): the cache goes through it."""
    torch.manual_seed(0)
    model = Transformer(32, 2, 2).eval().to(torch.bfloat16)
    x = torch.randn(2, 6, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        full = model(x, is_causal=True)
        cache = KVCache(2)
        steps = torch.cat([model(x[:, i:i + 1], cache=cache) for i in range(6)], 1)
        assert (steps.float() - full.float()).abs().max() < 0.05  # bf16 rounding
        with pytest.raises(ValueError, match="is_causal with a non-empty KVCache"):
            model(x[:, :1], is_causal=True, cache=cache)
        with pytest.raises(ValueError, match="KVCache of 3 layers"):
            model(x, cache=KVCache(3))


# ---------------------------------------------------------------------------- joint encoders
def _backbone(kind: str, seed: int = 0) -> JointEncoder:
    """A tiny backbone of each kind with large random weights (a random but far from uniform
    next-word distribution that depends on the image, so captions differ)."""
    cfg = ModelConfig()
    for tower in (cfg.vision, cfg.text, cfg.fusion):
        tower.width, tower.layers, tower.heads = 32, 2, 2
    cfg.vision.image_size, cfg.vision.patch_size, cfg.max_regions = 32, 8, 5
    arch = {"regions": "single_stream", "regions_post_ln": "single_stream",
            "patches": "single_stream", "dual_tower_bert": "dual_tower"}.get(kind, kind)
    spec = {"architecture": arch, "region_feature_dim": 12 if "regions" in kind else 0}
    cfg.visual_tokens = "patches" if kind == "patches" else "regions"
    if kind == "regions_post_ln":  # BERT's post-LN blocks (a converted BERT's)
        cfg.fusion.norm_first = False
    if kind == "combined":  # a bidirectional text tower: causal_text must make it causal
        cfg.text.mask, cfg.text.pool = "bidirectional", "cls"
    if kind == "dual_tower_bert":  # a BERT text tower: BertEmbed, post-LN blocks
        cfg.text.norm_first, cfg.text.mask, cfg.text.pool = False, "bidirectional", "cls"
    if kind.startswith("dual_tower"):
        spec["fusion"] = {"layers": 2, "heads": 2}
    spec["model"] = to_dict(cfg)
    torch.manual_seed(seed)
    backbone = JointEncoder(spec, vocab_size=40).eval()
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for p in backbone.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
        backbone.word_embeddings.weight.mul_(8)
    return backbone


def _images(kind: str, n: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if "regions" not in kind:
        return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}
    xy = torch.rand(n, 5, 2, generator=g) * 0.5
    counts = torch.tensor([5, 3, 1, 4, 2, 5, 3, 1])[:n]  # padded regions: the key mask matters
    return {"region_features": torch.randn(n, 5, 12, generator=g) * 3,
            "region_boxes": torch.cat([xy, xy + 0.4], -1),
            "region_mask": torch.arange(5)[None] < counts[:, None]}


@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_are_the_prefix_lm_forward(kind):
    backbone = _backbone(kind)
    visual = _images(kind, 4)
    ids = torch.randint(4, 40, (4, 9), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = BOS
    with torch.no_grad():
        full = backbone(ids, torch.ones_like(ids), visual, causal_text=True)  # (4, 9, W)
        state = backbone.start_decoding(backbone.encode_visual(visual))
        steps = [backbone.decode_step(ids[:, :3], state)]  # several words at once, then one
        steps += [backbone.decode_step(ids[:, i:i + 1], state) for i in range(3, 9)]
        assert state.position == 9
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
        # rows given other images' caches (select) are those images' forward
        perm = torch.tensor([1, 0, 3, 2])
        other = backbone.start_decoding(backbone.encode_visual(visual)).select(perm)
        swapped = backbone.decode_step(ids, other)
        permuted = backbone(ids, torch.ones_like(ids), {k: v[perm] for k, v in visual.items()},
                            causal_text=True)
        assert torch.allclose(swapped, permuted, atol=1e-4)
        assert not torch.allclose(swapped, full, atol=1e-3)
        with pytest.raises(ValueError, match="text positions"):
            backbone.decode_step(ids.repeat(1, 8), state)


def _eos_bias(model: FinetunedModel, visual: dict, max_length: int) -> float:
    """An EOS logit bias under which the uncached greedy captions end at different steps: the
    15% quantile of (best other logit - EOS logit) over the steps of the EOS-free captions."""
    step, n, _ = caption_step(model, visual)
    gaps = []

    def recording(tokens, images):
        logits = step(tokens, images)
        if tokens.shape[1] > 1:
            others = logits.clone()
            others[:, [PAD, BOS, EOS, MASK]] = float("-inf")
            gaps.append(others.max(-1).values - logits[:, EOS])
        return logits

    greedy_search(recording, n, bos_id=BOS, eos_id=EOS, max_length=max_length,
                  banned_ids=(PAD, BOS, MASK, EOS))
    return float(torch.cat(gaps).quantile(0.15))


def _count_new_positions(backbone: JointEncoder) -> tuple[list[int], object]:
    """Records the sequence length of every call of the joint Transformer."""
    seen: list[int] = []
    module = backbone.core.transformer if backbone.architecture == "single_stream" \
        else backbone.core.fusion
    hook = module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen, hook


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_captions_are_the_uncached_ones(kind, beam):
    backbone = _backbone(kind)
    model = FinetunedModel(backbone, CaptionHead()).eval()
    visual, max_length = _images(kind, 6), 10
    common = dict(bos_id=BOS, eos_id=EOS, max_length=max_length, banned_ids=(PAD, BOS, MASK))
    with torch.no_grad():
        backbone.mlm_head.bias[EOS] += _eos_bias(model, visual, max_length)

        def search(step, n, **extra):
            if beam == 1:
                return greedy_search(step, n, **common, **extra)
            return beam_search(step, n, beam_size=beam, length_penalty=1.0, **common, **extra)

        step, n, _ = caption_step(model, visual)
        uncached = search(step, n)
        seen, hook = _count_new_positions(backbone)
        step, n, _ = caption_step(model, visual, cached=True)
        assert isinstance(step, CachedStep)
        cached = search(step, n, reorder=step.reorder)
        hook.remove()
    assert cached == uncached
    lengths = [len(c) for c in uncached]
    # the batch holds captions ending at different steps, some early (so rows are dropped
    # and reordered mid-search)
    assert len(set(lengths)) >= 3 and min(lengths) < max_length, lengths
    assert len({tuple(c) for c in uncached}) >= 4  # the images' captions differ
    # the visual prefix once, then one new word per step
    assert seen[0] > 1 and len(seen) > max(lengths) and set(seen[1:]) == {1}, seen


def test_cached_step_needs_its_reorder():
    backbone = _backbone("patches")
    model = FinetunedModel(backbone, CaptionHead()).eval()
    step, n, _ = caption_step(model, _images("patches", 3), cached=True)
    tokens = torch.full((3, 1), BOS)
    with torch.no_grad():
        step(tokens, torch.arange(3))
        with pytest.raises(ValueError, match="reorder"):  # rows dropped without reorder
            step(torch.full((2, 2), 5), torch.arange(2))
        step.reorder(torch.tensor([2, 0]))
        assert step(torch.full((2, 2), 5), torch.tensor([2, 0])).shape == (2, 40)


@pytest.mark.parametrize("family", ["regions", "dual_tower"])
def test_generate_cached_on_pretrained_families(ft_world, pretrained, family):
    """The two families the caption task fine-tunes (tests/test_ft_caption.py), from real
    pretraining runs and shapes-world images: generate() writes the same captions either way."""
    from vlp.data.karpathy import read_karpathy
    from vlp.data.visual import VisualReader, collate_visual
    from vlp.tokenizer import Tokenizer

    backbone, tokenizer, transform = JointEncoder.from_pretrained(pretrained(family))
    model = FinetunedModel(backbone.eval(), CaptionHead()).eval()
    assert isinstance(tokenizer, Tokenizer)
    bench = ft_world / "benchmarks"
    reader = VisualReader(backbone.visual_needs(), transform, bench / "regions")
    images = [im for im in read_karpathy(bench / "coco" / "dataset_coco.json")][:8]
    visual = collate_visual([reader.read(bench / im["filepath"] / im["filename"])
                             for im in images])
    for beam in (1, 3):
        with torch.no_grad():
            got = generate(model, visual, tokenizer, beam_size=beam, max_length=12)
            want = generate(model, visual, tokenizer, beam_size=beam, max_length=12,
                            cached=False)
        assert got == want and all(isinstance(c, str) for c in got)
