"""Evaluation on frozen features: zero-shot classification, retrieval, linear probe, k-NN, dense probes.

All metrics are fractions in [0, 1] (not percent) except depth RMSE (in the depth map's units). Everything here is
deterministic for fixed inputs (no global RNG use): ties and initialisations are fixed by construction.

- zero-shot: CLIP paper sec. 3.1.4 prompt ensembling; open_clip `build_zero_shot_classifier` (mean of normalised
  text embeddings over templates, renormalised).
- retrieval: recall@k both directions, caption j pairs with image j.
- linear probe: logistic regression on standardised features (CLIP paper sec. 3.2 uses L-BFGS; we use full-batch
  AdamW with a cosine schedule, which converges to the same convex optimum closely enough at these sizes).
- k-NN: DINO's weighted k-NN (Caron et al. 2021, sec. 4.1 / eval_knn.py): cosine similarity, top-k neighbours vote
  with weight exp(sim / T), T = 0.07.
- dense probes: a 1x1 linear head on frozen patch tokens, logits bilinearly upsampled to the mask size
  (the standard "linear" segmentation probe of DINOv2 sec. 7.4 / depth probe of its sec. 7.5, miniaturised).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def _to_images(x):
    """numpy / torch uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]; float tensors/arrays pass through."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float().div_(255) if x.shape[-1] == 3 and x.ndim == 4 else x.float().div_(255)
    return x


def _t(x, dtype=None):
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    return x.to(dtype) if dtype is not None else x


@torch.no_grad()
def extract_features(fn, images, batch_size=256, device=None):
    """Apply `fn` to `images` in batches and return the concatenated outputs as a float32 CPU tensor.

    images: tensor / array with the batch on dim 0 (uint8 NHWC images are converted to float NCHW in [0, 1]),
    or a list (e.g. token tensors or strings) sliced as is. fn: batch -> (B, D) features (or any tensor)."""
    outs = []
    n = len(images)
    for i in range(0, n, batch_size):
        b = images[i:i + batch_size]
        if isinstance(b, np.ndarray) or torch.is_tensor(b):
            b = _to_images(b)
            if device is not None:
                b = b.to(device)
        outs.append(fn(b).float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames, templates, device=None):
    """Text classifier (C, D): per class, encode every template, L2-normalise, average, renormalise."""
    from common.train import unwrap
    model = unwrap(model)
    device = device or next(model.parameters()).device
    texts = [t.format(c) for c in classnames for t in templates]
    tok = tokenizer(texts).to(device)
    f = F.normalize(model.encode_text(tok, normalize=False).float(), dim=-1)
    f = f.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(f, dim=-1).cpu()


def zero_shot_accuracy(img_f, classifier, labels, k=1):
    """Top-k accuracy of argmax_c <img_f / |img_f|, classifier_c>. img_f (N, D), classifier (C, D), labels (N,)."""
    img_f = F.normalize(_t(img_f).float(), dim=-1)
    logits = img_f @ _t(classifier).float().to(img_f.device).T
    top = logits.topk(k, dim=-1).indices
    return (top == _t(labels).long().to(top.device)[:, None]).any(-1).float().mean().item()


def _ranks(sim):
    """Rank (0 = best) of the diagonal entry in each row of sim (N, N); ties broken by column index (a stable
    descending sort: an equal-scoring candidate with a lower index counts as ranked above)."""
    d = sim.diagonal()[:, None]
    idx = torch.arange(sim.shape[1], device=sim.device)
    before = (sim > d) | ((sim == d) & (idx[None, :] < torch.arange(sim.shape[0], device=sim.device)[:, None]))
    return before.sum(1)


def retrieval_recall(img_f, txt_f, ks=(1, 5, 10)):
    """Image<->text retrieval recall@k, assuming text j is the caption of image j (cosine similarity).

    i2t_rk: fraction of images whose caption is among the k most similar texts; t2i_rk: the converse;
    mean_rk = (i2t_rk + t2i_rk) / 2; mean_recall: mean over all directions and k. Ties: see _ranks."""
    img_f = F.normalize(_t(img_f).float(), dim=-1)
    txt_f = F.normalize(_t(txt_f).float(), dim=-1)
    if img_f.shape != txt_f.shape:
        raise ValueError(f"retrieval_recall: need paired features, got image {tuple(img_f.shape)} "
                         f"and text {tuple(txt_f.shape)}")
    sim = img_f @ txt_f.T
    r_i2t, r_t2i = _ranks(sim), _ranks(sim.T.contiguous())
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (r_i2t < k).float().mean().item()
        out[f"t2i_r{k}"] = (r_t2i < k).float().mean().item()
        out[f"mean_r{k}"] = (out[f"i2t_r{k}"] + out[f"t2i_r{k}"]) / 2
    out["mean_recall"] = sum(out[f"mean_r{k}"] for k in ks) / len(ks)
    return out


def _standardise(train, *others):
    mu, sd = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(x - mu) / sd for x in (train, *others)]


def linear_probe(train_f, train_y, test_f, test_y, epochs=100, lr=1e-2, wd=1e-4, batch_size=4096, seed=0,
                 num_classes=None, return_head=False):
    """Logistic-regression probe accuracy. Features standardised with train statistics; zero-initialised weights;
    AdamW with cosine lr for `epochs` passes (full batch when N <= batch_size, else shuffled minibatches from a
    torch.Generator(seed)). Deterministic.

    return_head=True returns (acc, head): head(features (M, D)) -> logits (M, C), applying the same standardisation
    (e.g. to label a transfer set with an adapted model)."""
    trf = _t(train_f).float()
    mu, sd = trf.mean(0, keepdim=True), trf.std(0, keepdim=True).clamp_min(1e-6)  # kept for the returned head
    Xtr, Xte = (trf - mu) / sd, (_t(test_f).float() - mu) / sd
    ytr, yte = _t(train_y).long(), _t(test_y).long()
    C = num_classes or int(max(ytr.max(), yte.max())) + 1
    W = torch.zeros(Xtr.shape[1], C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    N = len(Xtr)
    nb = max(1, math.ceil(N / batch_size))
    total, it = epochs * nb, 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(N, generator=g) if nb > 1 else torch.arange(N)
            for j in range(nb):
                idx = perm[j * batch_size:(j + 1) * batch_size]
                for grp in opt.param_groups:
                    grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / total))
                loss = F.cross_entropy(Xtr[idx] @ W + b, ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                it += 1
    with torch.no_grad():
        acc = ((Xte @ W + b).argmax(1) == yte).float().mean().item()
    if not return_head:
        return acc
    W, b = W.detach(), b.detach()
    return acc, lambda f: ((_t(f).float() - mu) / sd) @ W + b


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, k=10, T=0.07, weighted=True, chunk=1024):
    """k-NN accuracy with cosine similarity. weighted=True: DINO's vote, each of the k neighbours adds exp(sim/T) to
    its class; weighted=False: plain majority vote. Ties in the vote go to the lowest class id (argmax)."""
    tr = F.normalize(_t(train_f).float(), dim=-1)
    te = F.normalize(_t(test_f).float(), dim=-1)
    ytr, yte = _t(train_y).long(), _t(test_y).long()
    C = int(max(ytr.max(), yte.max())) + 1
    k = min(k, len(tr))
    correct = 0
    for i in range(0, len(te), chunk):
        sim, idx = (te[i:i + chunk] @ tr.T).topk(k, dim=1)
        w = (sim / T).exp() if weighted else torch.ones_like(sim)
        votes = torch.zeros(len(sim), C).scatter_add_(1, ytr[idx], w)
        correct += (votes.argmax(1) == yte[i:i + chunk]).sum().item()
    return correct / len(te)


def seg_confusion(pred, target, num_classes, ignore_index=None):
    """(K, K) confusion matrix, rows = target class, cols = predicted class, over all pixels of pred/target."""
    p, t = _t(pred).long().flatten(), _t(target).long().flatten()
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    p, t = p[keep].clamp(0, num_classes - 1), t[keep]
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes)


def seg_miou(pred, target, num_classes, ignore_index=None):
    """Mean intersection-over-union.

    The confusion matrix is accumulated over ALL pixels of the dataset (pred, target: integer maps of any equal
    shape, e.g. (N, H, W)). Per class c: IoU_c = TP_c / (TP_c + FP_c + FN_c). mIoU = mean of IoU_c over the classes
    that occur in the target or the prediction (TP+FP+FN > 0); absent classes are skipped, not counted as 1 or 0.
    Class 0 (background) counts like any other class. Target pixels equal to ignore_index are dropped."""
    cm = seg_confusion(pred, target, num_classes, ignore_index).double()
    tp = cm.diagonal()
    denom = cm.sum(0) + cm.sum(1) - tp  # TP + FP + FN
    present = denom > 0
    return (tp[present] / denom[present]).mean().item() if present.any() else float("nan")


def depth_rmse(pred, target, valid=None):
    """Root mean squared error sqrt(mean_p (pred_p - target_p)^2) over the valid pixels of the whole dataset.

    Valid: target finite and > 0 (0 marks missing depth, as in NYUv2), and `valid` (bool mask) when given."""
    p, t = _t(pred).double(), _t(target).double()
    if p.shape != t.shape:
        raise ValueError(f"depth_rmse: pred {tuple(p.shape)} and target {tuple(t.shape)} differ")
    m = torch.isfinite(t) & (t > 0)
    if valid is not None:
        m &= _t(valid).bool()
    return ((p[m] - t[m]) ** 2).mean().sqrt().item()


@torch.no_grad()
def _patch_features(patch_fn, images, batch_size, device):
    feats, grid = [], None
    for i in range(0, len(images), batch_size):
        x = _to_images(images[i:i + batch_size])
        out = patch_fn(x.to(device) if device is not None else x)
        f, grid = out if isinstance(out, tuple) else (out, None)
        feats.append(f.float().cpu())
    f = torch.cat(feats)
    if grid is None:  # square grid
        h = int(round(math.sqrt(f.shape[1])))
        grid = (h, f.shape[1] // h)
    if grid[0] * grid[1] != f.shape[1]:
        raise ValueError(f"dense_probe: {f.shape[1]} patch tokens do not fill a grid {grid}")
    return f, tuple(grid)


def dense_probe(patch_fn, train_images, train_seg, train_depth, test_images, test_seg, test_depth, num_classes,
                steps=300, label_fraction=1.0, lr=1e-2, wd=1e-4, batch_size=32, seed=0, device=None,
                feat_batch_size=64):
    """Semantic segmentation and depth probes on frozen patch features.

    patch_fn: images float (B, 3, H, W) in [0, 1] -> patch tokens (B, N, C) or ((B, N, C), (h, w)) (e.g.
      `lambda x: vit.patch_tokens(normalize(x))`); run once under no_grad, the features are cached.
    *_images: uint8 (N, H, W, 3) or float (N, 3, H, W); *_seg: int (N, H, W) with classes in [0, num_classes);
      *_depth: float (N, H, W) (either seg or depth may be None to skip that head).
    Heads: a 1x1 linear classifier (C -> num_classes) and a linear regressor (C -> 1) on standardised tokens; their
      (h, w) outputs are bilinearly upsampled to (H, W) and trained with pixel cross-entropy / masked MSE (on
      standardised depth) for `steps` AdamW steps on random minibatches. label_fraction < 1 trains on the first
      round(fraction * N) images of a seeded permutation (data-efficiency probes).
    Returns {"miou": seg_miou on test, "depth_rmse": depth_rmse on test} (only the keys whose targets were given).
    """
    g = torch.Generator().manual_seed(seed)
    n = len(train_images)
    keep = torch.randperm(n, generator=g)[:max(1, round(label_fraction * n))].sort().values
    keep_np = keep.numpy()
    sel = (lambda a: None if a is None else a[keep_np] if isinstance(a, np.ndarray) else _t(a)[keep])
    Ftr, grid = _patch_features(patch_fn, sel(train_images), feat_batch_size, device)
    Fte, _ = _patch_features(patch_fn, test_images, feat_batch_size, device)
    Ftr, Fte = _standardise(Ftr.flatten(0, 1), Fte.flatten(0, 1))
    Ftr, Fte = Ftr.view(len(keep), *grid, -1), Fte.view(-1, *grid, Fte.shape[-1])
    seg_tr = None if train_seg is None else _t(sel(train_seg)).long()
    dep_tr = None if train_depth is None else _t(sel(train_depth)).float()
    H, W = (seg_tr if seg_tr is not None else dep_tr).shape[-2:]
    C = Ftr.shape[-1]
    if dep_tr is not None:
        valid = torch.isfinite(dep_tr) & (dep_tr > 0)
        mu, sd = dep_tr[valid].mean(), dep_tr[valid].std().clamp_min(1e-6)
    # zero init: both heads are convex problems, so no RNG is needed and the result is deterministic
    Ws, bs = torch.zeros(C, num_classes, requires_grad=True), torch.zeros(num_classes, requires_grad=True)
    Wd, bd = torch.zeros(C, 1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([Ws, bs, Wd, bd], lr=lr, weight_decay=wd)

    def heads(f):  # f (B, h, w, C) -> seg logits (B, K, H, W), depth (B, H, W) in standardised units
        s = (f @ Ws + bs).permute(0, 3, 1, 2)
        d = (f @ Wd + bd).permute(0, 3, 1, 2)
        up = lambda z: F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)  # noqa: E731
        return up(s), up(d)[:, 0]

    with torch.enable_grad():
        for it in range(steps):
            idx = torch.randint(len(Ftr), (min(batch_size, len(Ftr)),), generator=g)
            s, d = heads(Ftr[idx])
            loss = 0.0
            if seg_tr is not None:
                loss = loss + F.cross_entropy(s, seg_tr[idx])
            if dep_tr is not None:
                m = valid[idx]
                loss = loss + F.mse_loss(d[m], ((dep_tr[idx] - mu) / sd)[m])
            for grp in opt.param_groups:
                grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / steps))
            opt.zero_grad()
            loss.backward()
            opt.step()
    out, preds, deps = {}, [], []
    with torch.no_grad():
        for i in range(0, len(Fte), 64):
            s, d = heads(Fte[i:i + 64])
            preds.append(s.argmax(1))
            deps.append(d)
    if test_seg is not None and seg_tr is not None:
        out["miou"] = seg_miou(torch.cat(preds), _t(test_seg), num_classes)
    if test_depth is not None and dep_tr is not None:
        out["depth_rmse"] = depth_rmse(torch.cat(deps) * sd + mu, _t(test_depth).float())
    return out


# ----------------------------------------------------------------------------------------------------------------
# zero-shot classification of an image folder with a checkpoint:
#   python -m common.eval zeroshot --checkpoint=model.safetensors --data=root/ --bpe=bpe_simple_vocab_16e6.txt.gz

# CLIP's 80 ImageNet prompts (Radford et al. 2021, notebooks/Prompt_Engineering_for_ImageNet.ipynb; open_clip's
# OPENAI_IMAGENET_TEMPLATES), in the published order.
OPENAI_IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)
FOLDER_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def list_image_folder(root):
    """root/CLASS/*.{jpg,png,...} -> (paths, labels, folder names); classes are the sorted sub-folder names, as
    torchvision's ImageFolder numbers them. Sub-folders without images are an error (a class that cannot be
    scored)."""
    from pathlib import Path
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for c, name in enumerate(folders):
        files = sorted(f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in FOLDER_EXTS)
        if not files:
            raise ValueError(f"--data {root}: class folder {name!r} has no images ({', '.join(FOLDER_EXTS)})")
        paths += files
        labels += [c] * len(files)
    if not folders:
        raise ValueError(f"--data {root}: no class sub-folders; expected root/CLASS/*.jpg")
    return paths, labels, folders


def read_classnames(path, folders):
    """Class names for the sorted folders: a file with one name a line in folder order, or `folder<TAB>name`
    lines (any order, every folder named once). path None -> folder names with '_' read as spaces."""
    if path is None:
        return [f.replace("_", " ") for f in folders]
    lines = [ln.rstrip("\n") for ln in open(path, encoding="utf-8") if ln.strip()]
    if lines and all("\t" in ln for ln in lines):
        names = dict(ln.split("\t", 1) for ln in lines)
        missing = [f for f in folders if f not in names]
        if missing:
            raise ValueError(f"--classes {path}: no name for folders {missing[:10]}")
        return [names[f].strip() for f in folders]
    if len(lines) != len(folders):
        raise ValueError(f"--classes {path}: {len(lines)} names for {len(folders)} class folders (one name a line, "
                         "in sorted folder order, or 'folder<TAB>name' lines)")
    return [ln.strip() for ln in lines]


def read_templates(path):
    """Prompt templates, one a line, each with one '{}' where the class name goes."""
    if path is None:
        return OPENAI_IMAGENET_TEMPLATES
    ts = [ln.strip() for ln in open(path, encoding="utf-8") if ln.strip()]
    bad = [t for t in ts if t.count("{}") != 1]
    if not ts or bad:
        raise ValueError(f"--templates {path}: every line needs exactly one '{{}}' for the class name"
                         + (f", e.g. not {bad[0]!r}" if bad else " (file is empty)"))
    return tuple(ts)


class FolderImages(torch.utils.data.Dataset):
    """(preprocessed image, readable?) per path; an unreadable file gives zeros and False instead of stopping."""

    def __init__(self, paths, prep, size):
        self.paths, self.prep, self.size = paths, prep, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.paths[i]) as im:
                return self.prep(im.convert("RGB")), True
        except (OSError, ValueError, SyntaxError):      # what PIL raises for corrupt / truncated / unknown files
            return torch.zeros(3, self.size, self.size), False


@torch.no_grad()
def zero_shot_folder(model, tokenizer, root, classnames=None, templates=OPENAI_IMAGENET_TEMPLATES, batch_size=64,
                     device="cpu", workers=0, mean=None, std=None, interpolation=None, class_batch=10):
    """Zero-shot top-1 / top-5 accuracy of a CLIP on root/CLASS/* images.

    The classifier is zero_shot_classifier (mean of normalised template embeddings, renormalised), built
    `class_batch` classes at a time as open_clip does; images go through the model's own eval transform
    (`eval_transform(**model.preprocess)`, as load_clip_checkpoint sets it: a ViT's PIL bicubic shorter side, center
    crop, CLIP mean/std; MobileCLIP's bilinear, no normalisation); mean / std / interpolation override its fields. Returns {"top1", "top5" (top-min(5, C)),
    "n_images", "n_classes", "n_templates", "n_unreadable", "per_class_top1": {name: acc}}; unreadable files are
    left out of the accuracies and counted."""
    from common.transforms import CLIP_MEAN, CLIP_STD, eval_transform
    paths, labels, folders = list_image_folder(root)
    names = list(classnames) if classnames is not None else [f.replace("_", " ") for f in folders]
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} class names for {len(folders)} class folders")
    model = model.to(device).eval()
    cls = torch.cat([zero_shot_classifier(model, tokenizer, names[i:i + class_batch], templates, device)
                     for i in range(0, len(names), class_batch)])                       # (C, D)
    pp = dict(getattr(model, "preprocess", None) or
              dict(size=model.visual.image_size, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic"))
    pp.update({k: v for k, v in dict(mean=mean, std=std, interpolation=interpolation).items() if v is not None})
    size = pp["size"]
    prep = eval_transform(**pp)
    loader = torch.utils.data.DataLoader(FolderImages(paths, prep, size), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    k = min(5, len(names))
    y = torch.tensor(labels)
    top, ok = [], []
    for x, good in loader:
        f = F.normalize(model.encode_image(x.to(device), normalize=False).float(), dim=-1).cpu()
        top.append((100.0 * f @ cls.T).topk(k, dim=-1).indices)
        ok.append(good)
    top, ok = torch.cat(top)[torch.cat(ok)], torch.cat(ok)
    y = y[ok]
    if len(y) == 0:
        raise ValueError(f"--data {root}: none of the {len(paths)} images could be read")
    hit1, hitk = top[:, 0] == y, (top == y[:, None]).any(-1)
    per = {names[c]: hit1[y == c].float().mean().item() for c in range(len(names)) if (y == c).any()}
    return {"top1": hit1.float().mean().item(), "top5": hitk.float().mean().item(), "n_images": len(y),
            "n_classes": len(names), "n_templates": len(templates), "n_unreadable": int((~ok).sum()),
            "per_class_top1": per}


def _zeroshot_cli(args):
    import json
    import os
    import time
    from common.models import load_clip_checkpoint
    from common.tokenizer import Tokenizer, world_tokenizer
    t0 = time.time()
    parse3 = (lambda s: tuple(float(v) for v in s.split(",")) if s else None)  # noqa: E731
    mean, std = parse3(args.mean), parse3(args.std)
    if (mean and len(mean) != 3) or (std and len(std) != 3):
        raise ValueError("--mean / --std take three comma-separated numbers")
    if args.tokenizer == "clip" and not args.bpe:
        raise ValueError("--bpe=PATH is required: CLIP's merges file bpe_simple_vocab_16e6.txt.gz (it ships in the "
                         "open-clip-torch wheel and OpenAI's CLIP repository)")
    qg = {"auto": None, "true": True, "false": False}[args.quick_gelu]
    model = load_clip_checkpoint(args.checkpoint, quick_gelu=qg, vision_heads=args.vision_heads,
                                 text_heads=args.text_heads, device=args.device)
    ctx = model.text.context_length
    tok = world_tokenizer(ctx) if args.tokenizer == "world" else Tokenizer.from_file(args.bpe, context_length=ctx)
    if tok.vocab_size > model.text.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the checkpoint's token_embedding has "
                         f"{model.text.vocab_size} rows: wrong --bpe / --tokenizer for this checkpoint")
    _, _, folders = list_image_folder(args.data)
    names = read_classnames(args.classes, folders)
    templates = read_templates(args.templates)
    r = zero_shot_folder(model, tok, args.data, names, templates, args.batch_size, args.device, args.workers,
                         mean, std, args.interpolation)
    r.update(checkpoint=str(args.checkpoint), data=str(args.data), seconds=round(time.time() - t0, 2),
             device=str(args.device), model=model.config)
    print(f"zero-shot {args.data}: {r['n_classes']} classes, {r['n_images']} images, {r['n_templates']} templates"
          f" | top-1 {r['top1']:.4f}  top-{min(5, r['n_classes'])} {r['top5']:.4f}"
          + (f" | {r['n_unreadable']} unreadable images skipped" if r["n_unreadable"] else ""))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = f"{args.out}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=1)
        os.replace(tmp, args.out)
    return r


def main(argv=None):
    import argparse
    import sys
    from common.convert import CheckpointError
    ap = argparse.ArgumentParser(prog="python -m common.eval", description="evaluation commands")
    sub = ap.add_subparsers(dest="cmd", required=True)
    z = sub.add_parser("zeroshot", help="zero-shot top-1/top-5 of a CLIP checkpoint on an image folder root/CLASS/*")
    z.add_argument("--checkpoint", required=True,
                   help="open_clip / OpenAI ViT CLIP or open_clip MobileCLIP weights (.safetensors)")
    z.add_argument("--data", required=True, help="image folder root/CLASS/*.jpg (classes = sorted sub-folders)")
    z.add_argument("--classes", default=None, help="class names: one a line in folder order, or folder<TAB>name "
                                                   "(default: folder names, '_' -> ' ')")
    z.add_argument("--templates", default=None, help="prompt templates, one a line with '{}' (default: CLIP's 80)")
    z.add_argument("--bpe", default=None,
                   help="CLIP merges file bpe_simple_vocab_16e6.txt.gz (needed for --tokenizer=clip)")
    z.add_argument("--tokenizer", default="clip", choices=("clip", "world"),
                   help="clip: CLIP's BPE from --bpe; world: the synthetic world's vocabulary (tests, world models)")
    z.add_argument("--batch_size", type=int, default=64)
    z.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for reading images")
    z.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    z.add_argument("--quick_gelu", default="auto", choices=("auto", "true", "false"),
                   help="auto: QuickGELU only for OpenAI-format checkpoints (bookkeeping keys present)")
    z.add_argument("--vision_heads", type=int, default=None, help="default width // 64 (ViT-H/g/bigG-14: 16)")
    z.add_argument("--text_heads", type=int, default=None, help="default width // 64")
    z.add_argument("--interpolation", default=None, choices=("bicubic", "bilinear"),
                   help="default: the checkpoint's own (ViT CLIPs bicubic, MobileCLIP bilinear)")
    z.add_argument("--mean", default=None, help="r,g,b normalisation mean (default: the checkpoint's own)")
    z.add_argument("--std", default=None, help="r,g,b normalisation std (default: the checkpoint's own)")
    z.add_argument("--out", default=None, help="write the results JSON here")
    z.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = ap.parse_args(argv)
    try:
        _zeroshot_cli(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
