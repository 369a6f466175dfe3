"""Where does a shapes-world dual tower lose the shape of an object? (issue 14 part 6)

Reads a model directory and the shapes world's zero-shot shape set (single-object val images)
and prints, side by side:
  - zero-shot shape top-1 with the set's own templates (what `vlp pretrain` reports);
  - the same with each shape named together with every colour ("a red circle", ... averaged
    over the 8 colours: a prompt ensemble);
  - the same with the image's own colour in the prompt ("a red circle" vs "a red square" for a
    red image): how well the text side separates shapes when colour is held fixed;
  - a linear probe (logistic regression fitted on single-object training images, scored on the
    val ones) on the image embeddings, on
    the class token before the projection and on the mean of the patch tokens (ViT towers):
    does the image side carry shape at all?
  - the same probe for colour, as a ceiling for comparison.

    python bench/shape_probe.py runs/a/model [--world ~/.cache/vlp/shapes-v5-seed0-n20000]
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

import vlp
from vlp.data.synth import COLORS, SHAPES
from vlp.engine.setup import SHAPES_FORMAT, cache_root


def single_object_images(world: Path, split: str = "val",
                         limit: int = 0) -> list[tuple[Image.Image, str, str]]:
    """(image, colour, shape) of the single-object images of a split (at most `limit`)."""
    out = []
    for shard in sorted((world / split).glob("*.tar")):
        if limit and len(out) >= limit:
            break
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if not name.endswith(".json"):
                    continue
                meta = json.loads(tar.extractfile(member).read())
                objects = meta.get("objects", [])
                if len(objects) != 1:
                    continue
                stem = name[:-len(".json")]
                image_name = next(n for n in members if n.startswith(stem + ".")
                                  and n.rsplit(".", 1)[1] in ("jpg", "png", "webp"))
                image = Image.open(io.BytesIO(tar.extractfile(members[image_name]).read()))
                out.append((image.convert("RGB"), objects[0]["color"], objects[0]["shape"]))
    return out


def article(text: str) -> str:
    return ("an " + text[2:]) if text.startswith("a ") and text[2] in "aeiou" else text


def class_embeddings(model, prompts: list[list[str]]) -> torch.Tensor:
    """Per class the normalised mean of its prompts' normalised embeddings (CLIP's ensemble)."""
    rows = []
    for texts in prompts:
        e = model.encode_text([article(t) for t in texts]).mean(0)
        rows.append(e / e.norm())
    return torch.stack(rows)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                   y_test: torch.Tensor, steps: int = 500) -> float:
    """Held-out accuracy of a multinomial logistic regression (full-batch Adam, weight decay
    1e-4) fitted on (x, y), standardised with the training statistics."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    classes = int(y.max()) + 1
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(x @ w + b, y).backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * float(((x_test @ w + b).argmax(1) == y_test).float().mean())


def probes(model, samples, templates, fit, fit_shape, fit_color, shape_y, color_y,
           label: str) -> None:
    """The zero-shot rows and the linear probes (see the module docstring), as a table."""
    colors, shapes = list(COLORS), list(SHAPES)
    images = model.encode_image([s[0] for s in samples])
    rows = []
    own = class_embeddings(model, [[t.replace("{c}", s) for t in templates] for s in shapes])
    rows.append(("zero-shot, the set's templates", (images @ own.T).argmax(1)))
    every = class_embeddings(model, [[f"a {c} {s}" for c in colors] for s in shapes])
    rows.append(("zero-shot, 'a {colour} {shape}' over all colours",
                 (images @ every.T).argmax(1)))
    per_color = {c: class_embeddings(model, [[f"a {c} {s}"] for s in shapes]) for c in colors}
    told = torch.stack([images[i] @ per_color[s[1]].T for i, s in enumerate(samples)])
    rows.append(("zero-shot, the image's own colour named", told.argmax(1)))
    print(f"{label}: {len(samples)} single-object val images, 6 shapes (chance 16.7%)")
    print(f"| {'measure':<52} | shape top-1 |")
    print(f"|{'-' * 54}|-------------|")
    for name, pred in rows:
        print(f"| {name:<52} | {100.0 * float((pred == shape_y).float().mean()):10.1f}% |")

    def views(items):
        """(embedding, class token before the projection, mean of the patch tokens)."""
        pixels = views_pixels(model, items)
        with torch.no_grad():
            tokens = model.model.visual.forward_features(pixels).float()  # class token first
        return model.encode_image(pixels), tokens[:, 0], tokens[:, 1:].mean(1)

    train_views, val_views = views(fit), views(samples)
    names = ("linear probe, image embedding (after projection)",
             "linear probe, class token before the projection",
             "linear probe, mean of the patch tokens")
    for name, x, x_val in zip(names, train_views, val_views):
        print(f"| {name:<52} | {probe_accuracy(x, fit_shape, x_val, shape_y):10.1f}% |")
    colour = probe_accuracy(train_views[0], fit_color, val_views[0], color_y)
    print(f"| {'(colour) linear probe, image embedding':<52} | {colour:10.1f}% |")
    print(f"(probes fitted on {len(fit)} single-object training images, scored on the val ones)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a dual-tower model directory")
    ap.add_argument("--world", default=str(cache_root() / f"shapes-{SHAPES_FORMAT}-seed0-n20000"))
    ap.add_argument("--probe-images", type=int, default=3000,
                    help="single-object training images the linear probes are fitted on")
    ap.add_argument("--supervised-steps", type=int, default=0,
                    help="also train a fresh image tower of the model's shape on the shape "
                         "labels of those images for this many steps (batch 128, AdamW 1e-3): "
                         "can this tower learn shape at all in that many steps?")
    ap.add_argument("--supervised-patch", type=int, default=0,
                    help="the fresh tower's patch size (default: the model's)")
    ap.add_argument("--supervised-stem", choices=["patch", "conv"],
                    help="the fresh tower's stem (model.vision.stem; default: the model's)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train the fresh tower from this many seeds (0, 1, ...): from scratch "
                         "a ViT's outcome varies with its seed")
    ap.add_argument("--skip-probes", action="store_true",
                    help="only the supervised tower (with --supervised-steps)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = vlp.load(args.model, device="cpu")
    world = Path(args.world)
    colors, shapes = list(COLORS), list(SHAPES)
    samples = single_object_images(world)
    shape_y = torch.tensor([shapes.index(s[2]) for s in samples])
    color_y = torch.tensor([colors.index(s[1]) for s in samples])
    fit = single_object_images(world, "train", args.probe_images)
    fit_shape = torch.tensor([shapes.index(s[2]) for s in fit])
    fit_color = torch.tensor([colors.index(s[1]) for s in fit])
    if not args.skip_probes:
        templates = [t for t in (world / "zeroshot" / "shape" /
                                 "zeroshot_classification_templates.txt").read_text().split("\n")
                     if t.strip()]
        probes(model, samples, templates, fit, fit_shape, fit_color, shape_y, color_y,
               args.model)
    if args.supervised_steps:
        vision = model.model.cfg.vision
        if args.supervised_patch:
            vision = replace(vision, patch_size=args.supervised_patch)
        if args.supervised_stem:
            vision = replace(vision, stem=args.supervised_stem)
        pixels, val_pixels = views_pixels(model, fit), views_pixels(model, samples)
        accs = []
        for seed in range(args.seeds):
            started = time.time()
            accs.append(supervised_tower(vision, model.model.cfg.embed_dim, pixels, fit_shape,
                                         val_pixels, shape_y, args.supervised_steps, seed))
            rate = args.supervised_steps * 128 / (time.time() - started)
            print(f"fresh image tower (patch {vision.patch_size}, stem {vision.stem}, seed "
                  f"{seed}) trained on the shape labels of {len(fit)} images "
                  f"({args.supervised_steps} steps of 128, {rate:.0f} samples/s): val shape "
                  f"top-1 {accs[-1]:.1f}%", flush=True)
        if len(accs) > 1:
            print(f"  mean over {len(accs)} seeds {sum(accs) / len(accs):.1f}% (min "
                  f"{min(accs):.1f}, max {max(accs):.1f})")


def views_pixels(model, items) -> torch.Tensor:
    return torch.stack([model.transform(s[0]) for s in items])


def supervised_tower(vision, embed_dim: int, pixels, y, val_pixels, val_y, steps: int,
                     seed: int = 0) -> float:
    """A fresh VisionTower of config `vision` and a linear head, trained with cross-entropy on
    (pixels, y); its accuracy on the val pixels."""
    from vlp.models.towers import VisionTower

    torch.manual_seed(seed)
    tower = VisionTower(vision, embed_dim)
    head = torch.nn.Linear(embed_dim, int(y.max()) + 1)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (128,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(tower(pixels[idx])), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        pred = head(tower(val_pixels)).argmax(1)
    return 100.0 * float((pred == val_y).float().mean())

if __name__ == "__main__":
    main()
