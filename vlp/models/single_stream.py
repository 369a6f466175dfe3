"""The single-stream model (VL-BERT / UNITER / ViLT): text and visual tokens in ONE sequence

    [CLS] w1 ... wn [SEP] <pad...> | v1 ... vR <pad...> | [END]
      word + position + segment 0      visual embedding + segment 1

through the same unified Transformer the dual tower uses (post-LN when initialised from BERT),
with the heads its objectives need: masked language modelling (BERT's prediction head, decoder
tied to the word embeddings), masked region classification / feature regression, and
image-text matching on [CLS].

Visual tokens (`model.visual_tokens`):
- patches: the image's patch embeddings with learned grid positions (ViLT); with
  `model.vision.arch=swin`, a Swin tower's final-stage tokens, each embedded with its cell's
  box as a region is (UNITER's region embedding: the token + the geometry of its grid cell,
  from `SwinFeatures.positions()`), so the stream sees where each token is at any image size;
- regions: precomputed region features with their box geometry (UNITER's region embedding);
- roi_align: a patch encoder (`model.vision`: a ViT without class token, or a Swin tower whose
  stage `model.vision.roi_stage` is pooled at 1/stride) over the image, its grid pooled by
  RoIAlign over the boxes, then the same region embedding; trained end to end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ModelConfig
from vlp.models.embed import BertEmbed, PatchEmbed
from vlp.models.encoder import (Transformer, build_attention_mask, make_activation,
                                set_drop_path)
from vlp.models.regions import RegionEmbed, RoIRegionFeatures, grid_cell_boxes
from vlp.models.swin import SwinFeatures, build_swin

TEXT, VISUAL = 0, 1  # segment (token type) ids


def prefix_lm_mask(n_text: int, seq_len: int, device=None) -> torch.Tensor:
    """(1, 1, T, T) bool for a sequence `text (n_text) | visual...`: words see earlier words and
    every visual token; visual tokens see visual tokens only (the image is the LM's prefix)."""
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    allowed[:n_text, :n_text] = torch.ones(n_text, n_text, dtype=torch.bool, device=device).tril()
    allowed[n_text:, :n_text] = False
    return allowed[None, None]


class MLMHead(nn.Module):
    """BERT's prediction head: dense + activation + LayerNorm, then the word embeddings
    transposed (tied) plus a bias. The dense layer maps the encoder's `width` to the word
    embeddings' (the same in BERT; a fusion wider or narrower than the text tower that owns
    the embeddings, as when fusing a published CLIP's towers, maps across)."""

    def __init__(self, width: int, act: str, norm_eps: float, word_embeddings: nn.Embedding):
        super().__init__()
        dim = word_embeddings.embedding_dim
        self.dense = nn.Linear(width, dim)
        self.act = make_activation(act)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.word_embeddings = word_embeddings  # shared, not a copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.act(self.dense(hidden)))
        return F.linear(h, self.word_embeddings.weight, self.bias)


class SingleStream(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, *, region_feature_dim: int = 0,
                 num_region_labels: int = 0, heads: tuple[str, ...] = ("mlm", "mrc", "mrfr",
                                                                          "itm")):
        super().__init__()
        f = cfg.fusion
        self.cfg, self.kind = cfg, cfg.visual_tokens
        self.vocab_size = vocab_size
        self.region_feature_dim, self.num_region_labels = region_feature_dim, num_region_labels
        self.text_embed = BertEmbed(vocab_size, f.width, max_positions=f.max_positions,
                                    type_vocab_size=2, norm_eps=f.norm_eps)
        v = cfg.vision
        self.swin_tokens = v.arch == "swin" and self.kind in ("patches", "roi_align")
        if self.kind == "patches" and self.swin_tokens:
            self.swin = build_swin(v)
            # final-stage tokens + their cells' boxes -> visual tokens (module docstring)
            self.grid_embed = RegionEmbed(self.swin.out_width, f.width, norm_eps=f.norm_eps)
        elif self.kind == "patches":
            self.patch_embed = PatchEmbed(v.image_size, v.patch_size, f.width, class_token=False,
                                          stem=v.stem, stem_channels=v.stem_channels)
        elif self.kind == "regions":
            if region_feature_dim <= 0:
                raise ValueError("visual_tokens=regions needs region_feature_dim (the width of "
                                 "the .regions.npz features)")
            self.region_embed = RegionEmbed(region_feature_dim, f.width, norm_eps=f.norm_eps)
        elif self.kind == "roi_align":
            if self.swin_tokens:
                self.swin = build_swin(v)
                self.roi_stage = v.roi_stage % len(self.swin.widths)  # -1: the last
                self.region_feature_dim = self.swin.widths[self.roi_stage]
            else:
                self.patch_embed = PatchEmbed(v.image_size, v.patch_size, v.width,
                                              class_token=False, pos_embed=v.pos_embed,
                                              stem=v.stem, stem_channels=v.stem_channels)
                self.visual_encoder = Transformer(v.width, v.layers, v.heads, v.mlp_ratio,
                                                  v.act, v.norm_eps)
                self.region_feature_dim = v.width
            self.roi_pool = RoIRegionFeatures()
            self.region_embed = RegionEmbed(self.region_feature_dim, f.width, norm_eps=f.norm_eps)
            if not self.swin_tokens:
                set_drop_path(self.visual_encoder.blocks, v.drop_path_rate)
        else:
            raise ValueError(f"unknown visual_tokens {self.kind!r}; choose patches, regions or "
                             "roi_align")
        self.visual_norm = nn.LayerNorm(f.width, eps=f.norm_eps)
        self.end_token = nn.Parameter(torch.randn(1, 1, f.width) * 0.02)
        self.transformer = Transformer(f.width, f.layers, f.heads, f.mlp_ratio, f.act,
                                       f.norm_eps, norm_first=f.norm_first)
        self.heads = tuple(heads)
        if "mlm" in heads:
            self.mlm_head = MLMHead(f.width, f.act, f.norm_eps,
                                    self.text_embed.token_embed)
        if "itm" in heads:
            self.itm_head = nn.Linear(f.width, 2)
        if "mrc" in heads and num_region_labels and self.kind != "patches":
            self.mrc_head = nn.Linear(f.width, num_region_labels)
        if "mrfr" in heads and self.kind != "patches":
            self.mrfr_head = nn.Linear(f.width, self.region_feature_dim)

    @property
    def has_regions(self) -> bool:
        return self.kind != "patches"

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.grad_checkpointing = enabled
        if self.swin_tokens:
            self.swin.set_grad_checkpointing(enabled)
        elif self.kind == "roi_align":
            self.visual_encoder.grad_checkpointing = enabled

    # ------------------------------------------------------------------ visual tokens
    def swin_features(self, pixel_values: torch.Tensor) -> SwinFeatures:
        """Swin towers only: every stage's tokens and the final ones (one trunk pass, which
        `embed_visual` takes as `stages=` so the caller can also pool grounded objects)."""
        return self.swin.forward_stages(pixel_values)

    def region_inputs(self, pixel_values, region_features, region_boxes, region_mask):
        """(features (B, R, D), boxes, mask): the regions' features before embedding — the
        file's for `regions`, RoIAlign-pooled encoder features for `roi_align` (a Swin tower:
        stage `roi_stage`'s map, which covers the image padded to its stride: 1/stride)."""
        if self.kind == "regions":
            return region_features, region_boxes, region_mask
        if self.swin_tokens:
            stages = self.swin_features(pixel_values)
            s = self.roi_stage
            pooled = self.roi_pool(stages.feature_map(s), region_boxes, region_mask,
                                   stride=stages.strides[s],
                                   image_size=tuple(pixel_values.shape[-2:]))
            return pooled, region_boxes, region_mask
        tokens = self.visual_encoder(self.patch_embed(pixel_values))  # (B, g*g, C)
        g = self.patch_embed.grid_size
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], g, g)
        return self.roi_pool(grid, region_boxes, region_mask), region_boxes, region_mask

    def grid_tokens(self, stages: SwinFeatures, image_size: tuple[int, int]) -> torch.Tensor:
        """Swin `patches`: (B, h*w, width) the final-stage tokens embedded with their cells'
        boxes (image_size: (H, W) of the pixels), before segment and norm."""
        tokens = stages.tokens  # (B, h*w, C_last), row-major on stages.grid
        cells = grid_cell_boxes(stages.positions(), stages.strides[-1], image_size)  # (h*w, 4)
        return self.grid_embed(tokens, cells.expand(tokens.shape[0], -1, -1))

    def embed_visual(self, features, boxes, mask, pixel_values=None, *,
                     stages: SwinFeatures | None = None):
        """Visual token embeddings (B, R, width) + segment 1, and their mask (B, R). Swin
        `patches`: `stages`, the trunk's features when already computed."""
        if self.kind == "patches":
            if self.swin_tokens:
                stages = stages if stages is not None else self.swin_features(pixel_values)
                tokens = self.grid_tokens(stages, tuple(pixel_values.shape[-2:]))
            else:
                tokens = self.patch_embed(pixel_values)
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        else:
            tokens = self.region_embed(features, boxes)
        segment = self.text_embed.type_embed.weight[VISUAL]
        return self.visual_norm(tokens + segment), mask

    # ------------------------------------------------------------------ the joint sequence
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               visual: torch.Tensor, visual_mask: torch.Tensor, *, causal_text: bool = False,
               word_add: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, L + R + 1, width) of `[CLS] text [SEP] | visual | [END]`.

        causal_text: the prefix-LM mask of captioning (UniLM's seq2seq mask, with the image as
        the source): word i sees the visual tokens and words <= i; visual tokens see only
        visual tokens, so they do not change as words are generated.
        word_add (B, L, width): added to the word embeddings before position/segment and the
        LayerNorm (VL-BERT's visual feature embedding of grounded words, VCR).
        """
        b, n_text = input_ids.shape
        zeros = torch.zeros_like(input_ids)
        if word_add is None:
            text = self.text_embed(input_ids, token_type_ids=zeros)
        else:
            words = self.text_embed.token_embed(input_ids)
            text = self.text_embed(inputs_embeds=words + word_add.to(words.dtype),
                                   token_type_ids=zeros)
        segment = self.text_embed.type_embed.weight[VISUAL]
        end = self.visual_norm(self.end_token + segment).expand(b, 1, -1).to(text.dtype)
        x = torch.cat([text, visual.to(text.dtype), end], dim=1)
        keep = torch.cat([attention_mask.bool(), visual_mask.bool(),
                          torch.ones(b, 1, dtype=torch.bool, device=x.device)], dim=1)
        mask = build_attention_mask("bidirectional", x.shape[1], padding_mask=keep)
        if causal_text:
            mask = mask & prefix_lm_mask(n_text, x.shape[1], x.device)
        return self.transformer(x, mask)

    def hidden_states(self, input_ids, attention_mask, *, pixel_values=None,
                      region_features=None, region_boxes=None, region_mask=None,
                      masked_regions=None, blank_visual=False):
        """-> (hidden states (B, L + R + 1, width), the regions' features before masking or
        None). `masked_regions` (B, R) bool zeroes those regions' features (masked region
        modelling); `blank_visual` hides every visual token (a text-only model)."""
        targets = None
        if self.has_regions:
            features, boxes, mask = self.region_inputs(pixel_values, region_features,
                                                       region_boxes, region_mask)
            targets = features
            if masked_regions is not None:
                features = features.masked_fill(masked_regions[..., None], 0.0)
            visual, mask = self.embed_visual(features, boxes, mask)
        else:
            visual, mask = self.embed_visual(None, None, None, pixel_values)
        if blank_visual:
            mask = torch.zeros_like(mask)
        return self.encode(input_ids, attention_mask, visual, mask), targets

    def forward(self, input_ids, attention_mask, *, task: str = "masked", mlm_labels=None,
                masked_regions=None, **visual) -> dict[str, torch.Tensor]:
        """One pass of the objectives, heads included (so DeepSpeed sees one forward).

        task="itm": {"itm_logits" (B, 2)} from [CLS].
        task="masked": for the positions chosen in `mlm_labels` (!= -100) {"mlm_logits"
        (M, vocab)}; for `masked_regions` {"mrc_logits" (K, labels), "mrfr_pred" (K, D),
        "mrfr_target" (K, D)} where the model has those heads.
        `visual`: pixel_values / region_features / region_boxes / region_mask / blank_visual.
        """
        hidden, targets = self.hidden_states(input_ids, attention_mask,
                                             masked_regions=masked_regions, **visual)
        if task == "itm":
            return {"itm_logits": self.itm_head(hidden[:, 0])}
        if task != "masked":
            raise ValueError(f"task={task!r}: expected 'masked' or 'itm'")
        out: dict[str, torch.Tensor] = {}
        n_text = input_ids.shape[1]
        if mlm_labels is not None and hasattr(self, "mlm_head"):
            out["mlm_logits"] = self.mlm_head(hidden[:, :n_text][mlm_labels != -100])
        if masked_regions is not None and self.has_regions:
            regions = hidden[:, n_text:n_text + masked_regions.shape[1]][masked_regions]
            if hasattr(self, "mrc_head"):
                out["mrc_logits"] = self.mrc_head(regions)
            if hasattr(self, "mrfr_head"):
                out["mrfr_pred"] = self.mrfr_head(regions)
                # roi_align's targets are the model's own features: regress, don't chase them
                out["mrfr_target"] = targets[masked_regions].detach()
        return out
