"""vlp.data: webdataset shards -> decoded, transformed, tokenized samples -> `Batch`.

    shards.py      list shards (braces, `::`, dirs, globs, pipe: URLs), count them, read tars
    transforms.py  PIL image -> normalized tensor (CLIP preprocess; random crop for training)
    pipeline.py    split by rank/worker -> block shuffle -> decode (skip + count bad input)
                   -> Batch; StreamPosition: save and resume the stream mid-epoch
    batch.py       the Batch dataclass
    synth.py       the synthetic shapes world
"""
from vlp.data.batch import Batch
from vlp.data.pipeline import (SkipCounter, StreamPosition, accumulate, format_skips,
                               iter_captions, iter_eval_samples, make_loader)
from vlp.data.shards import check_shards_vs_workers, count_samples, expand_urls
from vlp.data.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

__all__ = [
    "Batch", "SkipCounter", "StreamPosition", "accumulate", "format_skips", "iter_captions",
    "iter_eval_samples", "make_loader", "check_shards_vs_workers", "count_samples", "expand_urls",
    "CLIP_MEAN", "CLIP_STD", "ImageTransform",
]
