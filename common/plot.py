"""Small PIL plots every script draws: line charts, bar charts, heat maps and image grids, as PNG files.

No matplotlib (not a runtime dependency). Each function takes plain Python numbers and a path, draws one figure of
one or more panels side by side, and saves it:

    line_plot(path, [panel(title, {name: (xs, ys)}, xlabel, ylabel, logx=..., logy=..., points=...)])
    bar_plot(path, [(title, [(name, value), ...]), ...])
    heatmaps(path, {name: matrix}, title, row_labels=..., col_labels=...)
    image_grid(path, rows, labels=None)       # rows of uint8 (H, W, 3) arrays
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def color(i):
    return COLORS[i % len(COLORS)]


def panel(title, series, xlabel="", ylabel="", logx=False, logy=False, points=False, labels=None):
    """One line-chart panel. series: {name: (xs, ys)} or {name: (xs, ys, (r, g, b))}. points=True draws markers
    only (a scatter); labels: {name: [text per point]} written beside the points."""
    return dict(title=title, series=series, xlabel=xlabel, ylabel=ylabel, logx=logx, logy=logy, points=points,
                labels=labels or {})


def _ticks(lo, hi, n=5):
    return [lo + k * (hi - lo) / (n - 1) for k in range(n)]


def _draw_lines(d, font, box, p):
    L, T, R, B = box
    tx = math.log10 if p["logx"] else (lambda v: v)
    ty = math.log10 if p["logy"] else (lambda v: v)
    ser = {k: v for k, v in p["series"].items() if len(v[0])}
    xs = [tx(x) for s in ser.values() for x in s[0]]
    ys = [ty(y) for s in ser.values() for y in s[1] if y is not None and math.isfinite(y)]
    d.text((L, T - 22), p["title"], fill="black", font=font)
    d.rectangle([L, T, R, B], outline="black")
    if not xs or not ys:
        d.text((L + 10, T + 10), "no data", fill="black", font=font)
        return
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:  # one x value: a range around it wide enough for distinct tick labels
        dx = 0.1 * abs(x0) or 1.0
        x0, x1 = x0 - dx, x1 + dx
    pad = 0.06 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda v: L + (tx(v) - x0) / (x1 - x0) * (R - L)  # noqa: E731
    py = lambda v: B - (ty(v) - y0) / (y1 - y0) * (B - T)  # noqa: E731
    for v in _ticks(x0, x1):
        val = 10 ** v if p["logx"] else v
        x = L + (v - x0) / (x1 - x0) * (R - L)
        d.line([x, B, x, B + 4], fill="black")
        d.text((x - 12, B + 6), f"{val:.3g}", fill="black", font=font)
    for v in _ticks(y0, y1):
        val = 10 ** v if p["logy"] else v
        y = B - (v - y0) / (y1 - y0) * (B - T)
        d.line([L - 4, y, L, y], fill="black")
        d.text((L - 40, y - 6), f"{val:.3g}", fill="black", font=font)
    d.text(((L + R) // 2 - 3 * len(p["xlabel"]), B + 20), p["xlabel"], fill="black", font=font)
    d.text((R - 6 * len(p["ylabel"]), T - 22), p["ylabel"], fill="black", font=font)  # y axis name, top right
    for i, (name, s) in enumerate(ser.items()):
        col = s[2] if len(s) > 2 else color(i)
        pts = [(px(a), py(b)) for a, b in zip(s[0], s[1]) if b is not None and math.isfinite(b)]
        if len(pts) > 1 and not p["points"]:
            d.line(pts, fill=col, width=2)
        if p["points"] or len(pts) <= 12:
            for q in pts:
                d.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill=col)
        for q, text in zip(pts, p["labels"].get(name, [])):
            d.text((q[0] + 5, q[1] - 6), str(text), fill="black", font=font)
        d.rectangle([L + 8, T + 8 + 14 * i, L + 20, T + 16 + 14 * i], fill=col)
        d.text((L + 24, T + 5 + 14 * i), str(name), fill="black", font=font)


def line_plot(path, panels, size=(520, 360), cols=None):
    """panels: a list of panel(...) dicts (or one), in rows of `cols` (default: one row), each `size` pixels."""
    panels = [panels] if isinstance(panels, dict) else list(panels)
    W, H = size
    cols = cols or len(panels)
    rows = -(-len(panels) // cols)
    im = Image.new("RGB", (W * min(cols, len(panels)), H * rows), "white")
    d, font = ImageDraw.Draw(im), ImageFont.load_default()
    for k, p in enumerate(panels):
        x, y = (k % cols) * W, (k // cols) * H
        _draw_lines(d, font, (x + 60, y + 36, x + W - 16, y + H - 44), p)
    im.save(path)
    return path


def bar_plot(path, panels, ymax=None, size=(440, 320)):
    """panels: [(title, [(name, value), ...]), ...]; bars start at 0, value printed on top, names below."""
    W, H = size
    im = Image.new("RGB", (W * len(panels), H), "white")
    d, font = ImageDraw.Draw(im), ImageFont.load_default()
    for c, (title, bars) in enumerate(panels):
        L, T, R, B = c * W + 44, 30, c * W + W - 12, H - 56
        vals = [v for _, v in bars if v is not None]
        top = ymax if ymax is not None else (max(vals) * 1.15 if vals and max(vals) > 0 else 1.0)
        d.text((L, 8), title, fill="black", font=font)
        d.rectangle([L, T, R, B], outline="black")
        for v in _ticks(0.0, top, 6):
            y = B - v / top * (B - T)
            d.line([L - 4, y, L, y], fill="black")
            d.text((L - 36, y - 6), f"{v:.3g}", fill="black", font=font)
        bw = (R - L) / max(len(bars), 1)
        for k, (name, v) in enumerate(bars):
            xa = L + k * bw + 5
            if v is not None:
                d.rectangle([xa, B - min(v, top) / top * (B - T), xa + bw - 10, B], fill=color(k))
                d.text((xa, B - min(v, top) / top * (B - T) - 12), f"{v:.3f}", fill="black", font=font)
            for li, part in enumerate(str(name).split(" ", 2)):
                d.text((xa, B + 4 + 11 * li), part, fill="black", font=font)
    im.save(path)
    return path


def _shade(v, lo, hi):
    t = 0.5 if hi <= lo else (v - lo) / (hi - lo)
    return (int(255 * (1 - t) + 30 * t), int(255 * (1 - t) + 80 * t), int(255 * (1 - t) + 160 * t))


def heatmaps(path, mats, title="", row_labels=None, col_labels=None, cell=44, fmt="{:.2f}"):
    """mats: {name: 2-D list/array}; one shared colour scale; values written in the cells (None = blank)."""
    names = list(mats)
    shapes = [np.asarray(mats[n], dtype=object).shape for n in names]
    vals = [float(v) for n in names for row in mats[n] for v in row if v is not None]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    pad, head, left = 40, 44, 30   # pad: room for the next panel's row labels
    W = sum(s[1] * cell + pad for s in shapes) + pad + left
    H = head + max(s[0] for s in shapes) * cell + 36
    im = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(im), ImageFont.load_default()
    d.text((pad, 6), f"{title}  (range {lo:.3g} to {hi:.3g})", fill="black", font=font)
    x0 = pad + left
    for n, (nr, nc) in zip(names, shapes):
        d.text((x0, head - 16), str(n), fill="black", font=font)
        for i, row in enumerate(mats[n]):
            for j, v in enumerate(row):
                box = (x0 + j * cell, head + i * cell, x0 + (j + 1) * cell - 1, head + (i + 1) * cell - 1)
                if v is None:
                    d.rectangle(box, outline=(200, 200, 200))
                    continue
                d.rectangle(box, fill=_shade(float(v), lo, hi))
                dark = (float(v) - lo) > 0.5 * (hi - lo)
                d.text((box[0] + 5, box[1] + cell // 2 - 6), fmt.format(v), fill="white" if dark else "black",
                       font=font)
        for i in range(nr):
            d.text((x0 - 24, head + i * cell + cell // 2 - 6), str((row_labels or range(1, nr + 1))[i]),
                   fill="black", font=font)
        for j in range(nc):
            d.text((x0 + j * cell + cell // 2 - 6, head + nr * cell + 4), str((col_labels or range(1, nc + 1))[j]),
                   fill="black", font=font)
        x0 += nc * cell + pad
    im.save(path)
    return path


def image_grid(path, rows, labels=None, scale=1, gap=4):
    """rows: list of lists of uint8 (H, W, 3) or (H, W) arrays (one cell size per grid); labels: one text per
    row, drawn at its left."""
    cells = [[np.asarray(a) for a in r] for r in rows]
    h, w = cells[0][0].shape[:2]
    h, w = h * scale, w * scale
    left = 110 if labels else 0
    ncol = max(len(r) for r in cells)
    im = Image.new("RGB", (left + ncol * (w + gap) + gap, len(cells) * (h + gap) + gap), "white")
    d, font = ImageDraw.Draw(im), ImageFont.load_default()
    for i, r in enumerate(cells):
        if labels:
            d.text((4, gap + i * (h + gap) + h // 2 - 6), str(labels[i])[:18], fill="black", font=font)
        for j, a in enumerate(r):
            a = np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]
            tile = Image.fromarray(a.astype(np.uint8)).resize((w, h), Image.NEAREST)
            im.paste(tile, (left + gap + j * (w + gap), gap + i * (h + gap)))
    im.save(path)
    return path
