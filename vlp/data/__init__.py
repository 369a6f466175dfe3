"""vlp.data: webdataset shards -> decoded, transformed, tokenized samples -> `Batch`.

    shards.py      list shards (braces, `::`, dirs, globs, pipe: URLs), count them, read tars
    transforms.py  PIL image -> normalized tensor (CLIP preprocess; random crop for training)
    pipeline.py    split by rank/worker -> block shuffle -> decode (skip + count bad input)
                   -> Batch; StreamPosition: save and resume the stream mid-epoch;
                   visual="patches" | "regions" | "roi_align"
    regions.py     {key}.regions.npz (ours or bottom-up-attention's) -> Regions, validated
    batch.py       the Batch dataclass
    synth.py       the synthetic shapes world (with region features)
"""
from vlp.data.batch import Batch
from vlp.data.pipeline import (SKIP_REASONS, VISUAL_MODES, SkipCounter, StreamPosition,
                               accumulate, collate_regions, format_skips, has_region_files,
                               iter_captions, iter_eval_samples, make_loader,
                               region_feature_dim)
from vlp.data.regions import Regions, RegionError, read_regions
from vlp.data.shards import check_shards_vs_workers, count_samples, expand_urls
from vlp.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

__all__ = [
    "Batch", "SKIP_REASONS", "VISUAL_MODES", "SkipCounter", "StreamPosition", "accumulate",
    "collate_regions", "format_skips", "has_region_files", "iter_captions", "iter_eval_samples",
    "make_loader", "region_feature_dim", "Regions", "RegionError", "read_regions",
    "check_shards_vs_workers", "count_samples", "expand_urls", "CLIP_MEAN", "CLIP_STD",
    "ImageTransform",
]
