"""The joint (image + text) encoder every fine-tuning task head sits on, built from a model
directory of either pretraining family, with one interface for every head; and the
fine-tuned model (joint encoder + one head).

    encoder(input_ids, attention_mask, visual, causal_text=..., token_objects=...)
        -> (B, L, width) hidden states of the word positions; [:, 0] is [CLS]

- single_stream dirs (VL-BERT / UNITER / ViLT): the SingleStream model as pretrained, its
  MLM head kept (captioning's word predictor) and its ITM head kept (re-ranking).
- combined dirs (ALBEF style): the towers + fusion layers as pretrained.
- dual_tower dirs (CLIP style): the towers as pretrained, plus fresh fusion layers
  (FinetuneConfig.fusion) over [text tokens | image tokens] and a fresh word predictor tied to
  the text tower's embeddings. Vision and text widths must be equal, as in the combined model.

`visual` holds what the backbone's visual tokens need (`needs`): `pixel_values` (B, 3, H, W)
and/or `region_features` (B, R, D), `region_boxes` (B, R, 4) normalised x1y1x2y2,
`region_mask` (B, R). Grounded words (VCR: a word that names object k gets object k's visual
embedding added, as VL-BERT does) take `token_objects` (B, L) long, -1 = none, indexing the
objects: the regions themselves for region backbones, else `object_boxes` (B, N, 4) pooled by
RoIAlign from the patch grid (a Swin tower: from stage `model.vision.roi_stage`'s map at
1/stride, then `ground_proj` into the word width).

A Swin image tower (`model.vision.arch=swin`) serves every architecture: fused backbones fuse
its final-stage tokens (no class token), single-stream `patches` take them with their cells'
boxes, `roi_align` pools its chosen stage.

`encode_visual(visual)` computes the visual tokens once (captioning decodes many steps per
image); `forward` takes its output as `visual` in place of the raw inputs.

Caption decoding with a key/value cache: `start_decoding(encode_visual(...))` runs the visual
tokens alone through the joint Transformer once (under the prefix-LM mask they see only each
other, so their keys/values hold for every word), then `decode_step(new_ids, state)` encodes
only the new words against the cached keys/values (fused backbones: through the causal text
tower's cache, then the fusion's). `state.select(rows)` follows a beam search's rows.

The fused path is the combined model's own (`Combined.fuse`, the text tower's
`forward_features`), so pretraining and fine-tuning run one fusion forward.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from vlp import modeldir
from vlp.config import ConfigError, FusionConfig, ModelConfig, from_dict, to_dict
from vlp.data.transforms import ImageTransform
from vlp.data.visual import VisualNeeds
from vlp.models.combined import Combined
from vlp.models.embed import BertEmbed
from vlp.models.encoder import KVCache
from vlp.models.regions import RoIRegionFeatures
from vlp.models.resize import at_image_size
from vlp.models.single_stream import MLMHead, SingleStream
from vlp.models.swin import SwinFeatures
from vlp.tokenizer import Tokenizer

ARCHITECTURES = ("single_stream", "combined", "dual_tower")
PRETRAINING_ONLY = ("mrc_head.", "mrfr_head.")  # heads a fine-tuning encoder leaves out


class DecodeState:
    """A cached decoder's state between steps (JointEncoder.start_decoding / decode_step),
    rows being sequences: the joint Transformer's cache (`fusion`), which of its keys are real
    (`key_mask` (N, S) bool; None: all of them), the text tower's cache (fused backbones; else
    None) and how many words are encoded (`position`, the next word's)."""

    def __init__(self, fusion: KVCache, key_mask: torch.Tensor | None, text: KVCache | None):
        self.fusion, self.key_mask, self.text = fusion, key_mask, text
        self.position = 0

    def select(self, index: torch.Tensor) -> "DecodeState":
        """Keep rows `index` (N',) in that order, repeats allowed (in place; returns self)."""
        for cache in (self.fusion, self.text):
            if cache is not None:
                cache.select(index)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)
        return self


def _embed_words(embed: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The text tower's input embeddings of words at `positions` (N, L) -> (N, L, width): its
    own embedding's, a CLIP-style TextEmbed or a BERT text tower's BertEmbed."""
    if isinstance(embed, BertEmbed):
        return embed(ids, position_ids=positions)
    return embed.token_embed(ids) + embed.pos_embed[0, positions]


def _step_mask(key_mask: torch.Tensor | None, cached: int, new: int,
               device: torch.device) -> torch.Tensor | None:
    """(N or 1, 1, new, cached + new) bool: new word i sees the real cached keys and new words
    <= i (None when that is everything: one new word, no padded key)."""
    if new == 1 and key_mask is None:
        return None
    past = key_mask if key_mask is not None else torch.ones(1, cached, dtype=torch.bool,
                                                            device=device)
    causal = torch.ones(new, new, dtype=torch.bool, device=device).tril()  # (new, new)
    rows = past.shape[0]
    return torch.cat([past[:, None, None, :].expand(rows, 1, new, cached),
                      causal[None, None].expand(rows, 1, new, new)], dim=-1)


class JointEncoder(nn.Module):
    def __init__(self, spec: dict, vocab_size: int):
        """`spec`: {"architecture", "model": ModelConfig dict, "region_feature_dim",
        "num_region_labels", "fusion": FusionConfig dict (dual_tower only)}; weights random
        (load them with load_state_dict or `from_pretrained`)."""
        super().__init__()
        self.spec = dict(spec)
        self.architecture = spec["architecture"]
        cfg = from_dict(ModelConfig, spec["model"])
        self.cfg = cfg
        if self.architecture == "single_stream":
            self.core = SingleStream(cfg, vocab_size,
                                     region_feature_dim=spec.get("region_feature_dim", 0),
                                     num_region_labels=spec.get("num_region_labels", 0),
                                     heads=("mlm", "itm"))
            self.visual_tokens = cfg.visual_tokens
            self.width = cfg.fusion.width
            self.swin = self.core.swin_tokens
            if self.swin and self.visual_tokens == "patches":
                # grounded objects pooled from a Swin stage, into the stream's width
                ground_width = self._stage_width(cfg)
                self.ground_proj = nn.Linear(ground_width, self.width) \
                    if ground_width != self.width else nn.Identity()
        elif self.architecture in ("combined", "dual_tower"):
            if self.architecture == "dual_tower":
                # fresh fusion layers, pre-LN with the text tower's eps; width 0 (the default)
                # is the text tower's: equal-width towers then fuse without projections
                fresh = from_dict(FusionConfig, spec["fusion"])
                fusion = replace(fresh, width=fresh.width or cfg.text.width,
                                 norm_eps=cfg.text.norm_eps, norm_first=True)
                if fusion.width % fusion.heads:
                    raise ConfigError(f"fusion.width={fusion.width} must be divisible by "
                                      f"fusion.heads={fusion.heads}")
                cfg = self.cfg = replace(cfg, fusion=fusion)
                self.spec["model"] = to_dict(cfg)
            self.core = Combined(cfg, vocab_size)
            self.visual_tokens = "pixels"
            self.width = cfg.fusion.width
            self.swin = cfg.vision.arch == "swin"
            # grounded words (VCR) add their object's pooled image tokens (a Swin: its
            # roi_stage's map) to the word embeddings: across, when the widths differ
            t = cfg.text.width
            v = self._stage_width(cfg) if self.swin else cfg.vision.width
            self.ground_proj = nn.Linear(v, t) if v != t else nn.Identity()
        else:
            raise ValueError(f"architecture {self.architecture!r} cannot be fine-tuned; "
                             f"expected one of {list(ARCHITECTURES)}")
        self.roi_pool = RoIRegionFeatures()

    @staticmethod
    def _stage_width(cfg: ModelConfig) -> int:
        """The width of the Swin stage grounding pools (`model.vision.roi_stage`)."""
        v = cfg.vision
        return v.width * 2 ** (v.roi_stage % len(v.stage_depths))

    # ------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(cls, path: str | Path, fusion: FusionConfig | None = None,
                        image_size: int = 0, drop_path_rate: float = 0.0,
                        ) -> tuple["JointEncoder", Tokenizer, ImageTransform]:
        """The joint encoder of a pretrained model directory (its weights loaded), its
        tokenizer and eval transform; `image_size` > 0: at that image size (positions
        resampled, vlp/models/resize.py); `drop_path_rate`: the image encoder's stochastic
        depth for this run (the pretraining run's is not kept)."""
        folder = at_image_size(modeldir.read(path, ARCHITECTURES), image_size)
        arch = folder.architecture
        tokenizer = folder.tokenizer()
        model = copy.deepcopy(folder.config["model"])
        model.setdefault("vision", {})["drop_path_rate"] = drop_path_rate
        spec = {"architecture": arch, "model": model,
                "region_feature_dim": folder.config.get("region_feature_dim", 0),
                "num_region_labels": len(folder.config.get("region_labels", []))}
        if arch == "dual_tower":
            spec["fusion"] = to_dict(fusion or FusionConfig(layers=2))
        encoder = cls(spec, tokenizer.vocab_size)
        if drop_path_rate and not encoder.image_blocks():
            raise ConfigError(f"model.vision.drop_path_rate={drop_path_rate}: {path} (a "
                              f"{arch} model, visual_tokens={encoder.cfg.visual_tokens}) has no "
                              "image encoder blocks to drop")
        # a combined directory keeps its towers in model.safetensors, everything in
        # combined.safetensors; a dual tower gets fresh fusion layers
        name = modeldir.COMBINED_WEIGHTS if arch == "combined" else modeldir.WEIGHTS
        state = {k: v for k, v in folder.weights(name).items()
                 if not k.startswith(PRETRAINING_ONLY)}
        target = encoder.core.towers if arch == "dual_tower" else encoder.core
        modeldir.load_weights(target, state, str(folder.path / name))
        return encoder, tokenizer, folder.transform()

    def image_blocks(self) -> list:
        """The image encoder's blocks (stochastic depth's span); none for region features or
        a single stream's ViT patches (their tokens go straight into the stream)."""
        core = self.core
        if self.architecture != "single_stream":
            return core.towers.visual.blocks()
        if getattr(core, "swin", None) is not None:
            return core.swin.blocks()
        encoder = getattr(core, "visual_encoder", None)
        return list(encoder.blocks) if encoder is not None else []

    # ------------------------------------------------------------------ what it needs
    @property
    def needs_pixels(self) -> bool:
        return self.visual_tokens in ("pixels", "patches", "roi_align")

    @property
    def needs_region_features(self) -> bool:
        return self.visual_tokens == "regions"

    @property
    def needs_region_boxes(self) -> bool:
        return self.visual_tokens in ("regions", "roi_align")

    @property
    def objects_are_regions(self) -> bool:
        """Grounding indexes the visual regions (so VCR's objects must be the regions)."""
        return self.visual_tokens in ("regions", "roi_align")

    @property
    def text_positions(self) -> int:
        """How many word positions the text embedding has."""
        if self.architecture == "single_stream":
            return self.cfg.fusion.max_positions
        return self.cfg.text.context_length

    def visual_needs(self) -> VisualNeeds:
        """What a VisualReader must read for this encoder's visual tokens."""
        return VisualNeeds(self.visual_tokens, self.needs_pixels, self.needs_region_features,
                           self.needs_region_boxes, self.cfg.max_regions,
                           self.spec.get("region_feature_dim", 0))

    @property
    def word_embeddings(self) -> nn.Embedding:
        if self.architecture == "single_stream":
            return self.core.text_embed.token_embed
        return self.core.towers.text.embed.token_embed

    @property
    def mlm_head(self) -> MLMHead:
        return self.core.mlm_head

    @property
    def itm_head(self) -> nn.Linear:
        return self.core.itm_head

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.core.set_grad_checkpointing(enabled)

    # ------------------------------------------------------------------ forward
    def encode_visual(self, visual: dict, *, objects: bool = False,
                      object_boxes: torch.Tensor | None = None,
                      object_mask: torch.Tensor | None = None) -> dict:
        """The visual tokens of `visual`'s raw inputs, ready for `forward(..., visual=<this>)`:
        {"visual_tokens" (B, R, W), "visual_mask" (B, R)} (single stream, embedded) or
        {"image_tokens" (B, T, W)} (the vision tower's output: a ViT's class + patch tokens,
        a Swin's final-stage grid). Rows index like the inputs'. For grounded words
        (token_objects) a single stream also needs `objects=True`: "objects" (B, N, W), the embeddings grounded words add (the regions', or for patch
        tokens `object_boxes` pooled from the patch grid); fused backbones pool theirs from
        "image_tokens" in `forward` (given object_boxes there)."""
        if self.architecture != "single_stream":
            return {"image_tokens": self.core.towers.visual.forward_features(
                visual["pixel_values"])}
        m = self.core
        if m.has_regions:
            feats, boxes, rmask = m.region_inputs(visual.get("pixel_values"),
                                                  visual.get("region_features"),
                                                  visual["region_boxes"], visual["region_mask"])
            vis, vmask = m.embed_visual(feats, boxes, rmask)
            out = {"visual_tokens": vis, "visual_mask": vmask}
            if objects:
                out["objects"] = m.region_embed(feats, boxes)
        else:
            vis, vmask = m.embed_visual(None, None, None, visual["pixel_values"])
            out = {"visual_tokens": vis, "visual_mask": vmask}
            if objects:
                if object_boxes is None:
                    raise ValueError("grounded words need object_boxes with patch tokens")
                out["objects"] = self._pool_grid(m.patch_embed(visual["pixel_values"]),
                                                 m.patch_embed.grid_size, object_boxes,
                                                 object_mask)
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: dict, *,
                causal_text: bool = False, token_objects: torch.Tensor | None = None,
                object_boxes: torch.Tensor | None = None,
                object_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> (B, L, width) hidden states of the word positions (see the module docstring)."""
        if self.architecture == "single_stream":
            return self._single_stream(input_ids, attention_mask, visual, causal_text,
                                       token_objects, object_boxes, object_mask)
        return self._fused(input_ids, attention_mask, visual, causal_text, token_objects,
                           object_boxes, object_mask)

    def _grounding(self, objects: torch.Tensor, token_objects: torch.Tensor) -> torch.Tensor:
        """(B, N, W) object embeddings, (B, L) indexes (-1: none) -> (B, L, W) to add."""
        index = token_objects.clamp(min=0)
        picked = torch.gather(objects, 1, index[..., None].expand(-1, -1, objects.shape[-1]))
        return picked * (token_objects >= 0)[..., None].to(picked.dtype)

    def _pool_grid(self, tokens: torch.Tensor, grid: int, boxes, mask) -> torch.Tensor:
        """(B, grid*grid, C) patch tokens -> (B, N, C), one vector per box (RoIAlign)."""
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid)
        return self.roi_pool(fmap, boxes.float(), mask).to(tokens.dtype)

    def object_features(self, stages: SwinFeatures, image_size: tuple[int, int],
                        boxes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Swin backbones: (B, N, W) grounded objects' embeddings (what `token_objects` adds to
        the words): each box pooled by RoIAlign from stage `model.vision.roi_stage`'s map,
        which covers the image (H, W) = `image_size` padded up to the stride (boxes go in
        pixels at spatial scale 1/stride), then `ground_proj` into the words' width."""
        s = self.cfg.vision.roi_stage % len(stages.strides)
        pooled = self.roi_pool(stages.feature_map(s), boxes.float(), mask,
                               stride=stages.strides[s], image_size=image_size)
        return self.ground_proj(pooled.to(stages.tokens.dtype))

    def _single_stream(self, ids, mask, visual, causal_text, token_objects, object_boxes,
                       object_mask):
        m = self.core
        word_add = None
        if "visual_tokens" in visual:  # encode_visual's output
            if token_objects is not None:
                if "objects" not in visual:
                    raise ValueError("grounded words (token_objects) with encode_visual's "
                                     "tokens need its objects: encode_visual(..., objects=True)")
                word_add = self._grounding(visual["objects"], token_objects)
            vis, vmask = visual["visual_tokens"], visual["visual_mask"]
        elif m.has_regions:
            feats, boxes, rmask = m.region_inputs(visual.get("pixel_values"),
                                                  visual.get("region_features"),
                                                  visual["region_boxes"], visual["region_mask"])
            vis, vmask = m.embed_visual(feats, boxes, rmask)
            if token_objects is not None:
                word_add = self._grounding(m.region_embed(feats, boxes), token_objects)
        elif self.swin and token_objects is not None:  # patches: one trunk pass for both
            if object_boxes is None:
                raise ValueError("grounded words need object_boxes with patch tokens")
            px = visual["pixel_values"]
            stages = m.swin_features(px)
            vis, vmask = m.embed_visual(None, None, None, px, stages=stages)
            objects = self.object_features(stages, tuple(px.shape[-2:]), object_boxes,
                                           object_mask)
            word_add = self._grounding(objects, token_objects)
        else:
            vis, vmask = m.embed_visual(None, None, None, visual["pixel_values"])
            if token_objects is not None:
                if object_boxes is None:
                    raise ValueError("grounded words need object_boxes with patch tokens")
                patches = m.patch_embed(visual["pixel_values"])
                objects = self._pool_grid(patches, m.patch_embed.grid_size, object_boxes,
                                          object_mask)
                word_add = self._grounding(objects, token_objects)
        hidden = m.encode(ids, mask, vis, vmask, causal_text=causal_text, word_add=word_add)
        return hidden[:, :ids.shape[1]]

    def _fused_visual(self, visual, token_objects, object_boxes, object_mask):
        """A fused backbone's (image tokens, grounded words' additions or None)."""
        towers = self.core.towers
        if token_objects is not None and object_boxes is None:
            raise ValueError("grounded words need object_boxes")
        if token_objects is not None and self.swin:  # grounding pools a stage: one trunk pass
            if "pixel_values" not in visual:
                raise ValueError("grounded words (token_objects) with a Swin tower need the "
                                 "raw pixel_values, not encode_visual's tokens")
            px = visual["pixel_values"]
            stages = towers.visual.forward_stages(px)
            objects = self.object_features(stages, tuple(px.shape[-2:]), object_boxes,
                                           object_mask)
            return stages.tokens, self._grounding(objects, token_objects)  # (B, h*w, C_last)
        image_tokens = visual["image_tokens"] if "image_tokens" in visual else \
            towers.visual.forward_features(visual["pixel_values"])  # (B, T, W)
        if token_objects is None:
            return image_tokens, None
        grid = towers.visual.embed.grid_size
        objects = self._pool_grid(image_tokens[:, 1:], grid, object_boxes, object_mask)
        return image_tokens, self._grounding(self.ground_proj(objects), token_objects)

    def _fused(self, ids, mask, visual, causal_text, token_objects, object_boxes, object_mask):
        towers = self.core.towers
        image_tokens, word_add = self._fused_visual(visual, token_objects, object_boxes,
                                                    object_mask)
        # a causal text tower keeps its causal mask; captioning makes any tower causal
        text_tokens = towers.text.forward_features(ids, mask, causal=causal_text, add=word_add)
        return self.core.fuse(text_tokens, mask, image_tokens, causal_text=causal_text)

    # ------------------------------------------------------------------ cached decoding
    def start_decoding(self, encoded: dict) -> DecodeState:
        """The state before the first word, one row per image of `encoded` (encode_visual's
        output): the visual tokens' keys/values in every layer of the joint Transformer. Under
        the prefix-LM mask (`causal_text=True`) they attend to visual tokens only, so they are
        the same whatever words follow."""
        if self.architecture == "single_stream":
            m = self.core
            vis, vmask = encoded["visual_tokens"], encoded["visual_mask"].bool()
            # the [END] token closes the visual segment, as in SingleStream.encode
            end = m.visual_norm(m.end_token + m.text_embed.type_embed.weight[1])
            x = torch.cat([vis, end.expand(vis.shape[0], 1, -1).to(vis.dtype)], dim=1)
            keep = torch.cat([vmask, vmask.new_ones(vis.shape[0], 1)], dim=1)  # (B, R + 1)
            fusion = KVCache(len(m.transformer.blocks))
            m.transformer(x, keep[:, None, None, :], cache=fusion)
            return DecodeState(fusion, None if bool(keep.all()) else keep, None)
        core = self.core
        image = encoded["image_tokens"]
        # the image half of Combined.fuse's sequence (its projection and segment)
        x = core.image_proj(image) + core.segment.weight[1]
        fusion = KVCache(len(core.fusion.blocks))
        core.fusion(x, cache=fusion)
        return DecodeState(fusion, None, KVCache(len(core.towers.text.transformer.blocks)))

    def decode_step(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """input_ids (N, L): the words after those `state` holds (L = 1 when decoding) ->
        (N, L, width) their hidden states, as `forward(..., causal_text=True)` gives at
        those positions for the whole prefix; `state` takes their keys/values."""
        n, new = input_ids.shape
        start = state.position
        if start + new > self.text_positions:
            raise ValueError(f"word position {start + new - 1} is beyond the backbone's "
                             f"{self.text_positions} text positions")
        positions = torch.arange(start, start + new, device=input_ids.device)
        if self.architecture == "single_stream":
            m = self.core
            x = m.text_embed(input_ids, token_type_ids=torch.zeros_like(input_ids),
                             position_ids=positions)
            mask = _step_mask(state.key_mask, len(state.fusion), new, x.device)
            hidden = m.transformer(x, mask, cache=state.fusion)
        else:
            core, text = self.core, self.core.towers.text
            x = _embed_words(text.embed, input_ids, positions)
            # the text tower is causal when captioning: word i sees the cached words and itself
            words = text.transformer(x, _step_mask(None, start, new, x.device),
                                     cache=state.text)
            x = core.text_proj(words) + core.segment.weight[0]  # Combined.fuse's text half
            hidden = core.fusion(x, _step_mask(None, len(state.fusion), new, x.device),
                                 cache=state.fusion)
        if state.key_mask is not None:
            state.key_mask = torch.cat([state.key_mask, state.key_mask.new_ones(n, new)], 1)
        state.position += new
        return hidden


class FinetunedModel(nn.Module):
    """The joint encoder and one task head; forward(**batch) is the head's (so DeepSpeed sees
    one module and one forward per micro-batch)."""

    def __init__(self, encoder: JointEncoder, head: nn.Module):
        super().__init__()
        self.backbone = encoder
        self.head = head

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enabled)

    def forward(self, **inputs) -> dict[str, torch.Tensor]:
        return self.head(self.backbone, **inputs)
