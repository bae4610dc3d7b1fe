"""`factory gallery`: one self-contained HTML contact sheet of an output folder (DESIGN §5).

Each of the first ``n`` samples (in index order) gets a tile: the image
upscaled with its labels drawn on it (boxes as rectangles, points as
crosses), its density map as a heat map and its instance mask (a colour per
object) beside it, or a note that it has no mask, the count with the count
checker's verdict, the caption, and the provenance (key, source key, seed, op
chain with parameters, checks, edit) in a hover title and a <details> block.
Images are embedded as base64 PNG data URIs, so the page works copied alone.
"""
from __future__ import annotations

import base64
import colorsys
import html as _html
import io
import json

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from .errors import FactoryError
from .masks import MEMBER as MASK
from .masks import check_mask, decode_mask
from .sample import IMAGE_EXTENSIONS
from .shards import INDEX, MANIFEST, OutputDir

GALLERY = "gallery.html"
TILE_PX = 192  # target side of an upscaled image

BOX_COLOUR = (0, 255, 255)  # cyan, with a dark halo
POINT_COLOUR = (255, 0, 255)  # magenta, with a white halo
HALO_DARK = (0, 0, 0)
HALO_LIGHT = (255, 255, 255)
MASK_BACKGROUND = (40, 40, 40)

# A hand-written "inferno"-like colormap: (position, RGB) stops, interpolated linearly.
_CMAP_STOPS = np.array([0.0, 0.15, 0.35, 0.55, 0.75, 0.9, 1.0])
_CMAP_RGB = np.array([
    [0, 0, 4], [31, 12, 72], [101, 21, 110], [173, 48, 90], [237, 105, 37], [251, 180, 26], [252, 255, 164],
], dtype=np.float64)


def esc(value) -> str:
    return _html.escape(str(value), quote=True)


# --- images -----------------------------------------------------------------

def upscale(image: Image.Image, target: int = TILE_PX) -> tuple[Image.Image, float, float]:
    """The image at about ``target`` px on its longer side, and the x/y scale factors.

    Small images grow by an integer factor with nearest neighbour (pixels stay
    crisp squares); images larger than the target shrink smoothly.
    """
    w, h = image.size
    longest = max(w, h, 1)
    if longest <= target:
        f = max(1, target // longest)
        out = image.resize((w * f, h * f), Image.NEAREST)
    else:
        f = target / longest
        out = image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)
    return out, out.size[0] / w, out.size[1] / h


def annotate(image: Image.Image, sx: float, sy: float, points=None, boxes=None) -> Image.Image:
    """A copy of the (upscaled) image with boxes and points drawn on it.

    Coordinates are in the original image's pixels, continuous (pixel i spans
    [i, i+1)); boxes are xyxy with exclusive ends; they are scaled by sx, sy.
    """
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    for b in boxes or []:
        try:
            x0, y0, x1, y1 = (float(v) for v in b[:4])
        except (TypeError, ValueError):
            continue
        r = [round(x0 * sx), round(y0 * sy), max(round(x0 * sx), round(x1 * sx) - 1), max(round(y0 * sy), round(y1 * sy) - 1)]
        d.rectangle([r[0] - 1, r[1] - 1, r[2] + 1, r[3] + 1], outline=HALO_DARK, width=3)
        d.rectangle(r, outline=BOX_COLOUR, width=1)
    arm = max(3, round(min(sx, sy) * 1.5))
    for p in points or []:
        try:
            x, y = float(p[0]) * sx, float(p[1]) * sy
        except (TypeError, ValueError, IndexError):
            continue
        x, y = round(x), round(y)
        for colour, width in ((HALO_LIGHT, 4), (POINT_COLOUR, 2)):
            d.line([x - arm, y, x + arm, y], fill=colour, width=width)
            d.line([x, y - arm, x, y + arm], fill=colour, width=width)
    return out


def heatmap(density: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The density map normalised to its maximum, coloured, resized to ``size`` (bilinear: it is smooth)."""
    d = np.nan_to_num(np.asarray(density, dtype=np.float64).squeeze(), nan=0.0, posinf=0.0, neginf=0.0)
    if d.ndim != 2:
        d = d.reshape(d.shape[0], -1) if d.ndim > 2 else np.atleast_2d(d)
    d = np.clip(d, 0, None)
    peak = d.max() if d.size else 0.0
    v = d / peak if peak > 0 else np.zeros_like(d)
    rgb = np.stack([np.interp(v, _CMAP_STOPS, _CMAP_RGB[:, c]) for c in range(3)], axis=-1)
    im = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    return im.resize(size, Image.BILINEAR)


def instance_colours(n: int) -> np.ndarray:
    """(n + 1, 3) uint8: the background's colour, then one per object id. Hues step by the golden
    angle, so neighbouring ids (often neighbouring objects) never look alike."""
    out = [MASK_BACKGROUND]
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.asarray(out, np.uint8)


def mask_image(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An instance mask coloured by id, resized to ``size`` (nearest: ids never blend)."""
    ids = np.asarray(mask, np.int64)
    rgb = instance_colours(int(ids.max(initial=0)))[ids]
    return Image.fromarray(rgb, "RGB").resize(size, Image.NEAREST)


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- reading ------------------------------------------------------------------

def _open_output(url: str, n: int) -> tuple[OutputDir, dict, dict]:
    if not isinstance(n, int) or n <= 0:
        raise FactoryError(f"--n must be a positive number of samples to show (got {n!r}); e.g. --n 64")
    out = OutputDir(url)
    if not out.fs.exists(out.path(INDEX)):
        raise FactoryError(
            f"{url!r} has no {INDEX}: not a finished factory output. Point `factory gallery` at the folder "
            f"a run wrote (the one with {INDEX} and shard-*.tar), or rerun the recipe to finish it."
        )
    try:
        with out.fs.open(out.path(INDEX)) as f:
            index = json.load(f)
        index["shardlist"]
    except (ValueError, KeyError, TypeError) as e:
        raise FactoryError(f"{url!r}: {INDEX} is unreadable ({e}); rerun the recipe to rewrite it") from e
    manifest = {}
    if out.fs.exists(out.path(MANIFEST)):
        try:
            manifest = out.manifest()
        except ValueError:
            manifest = {}
    return out, index, manifest


def read_samples(url: str, n: int):
    """The first ``n`` samples of an output folder, in index order, as webdataset dicts."""
    out, index, _ = _open_output(url, n)
    return list(_iter_samples(out, url, index, n))


def _iter_samples(out: OutputDir, url: str, index: dict, n: int):
    shown = 0
    for shard in index["shardlist"]:
        if shown >= n:
            return
        path = out.path(shard["url"])
        src = out.fs.unstrip_protocol(path) if "://" in url else path
        for sample in wds.WebDataset(src, shardshuffle=False, empty_check=False):
            yield sample
            shown += 1
            if shown >= n:
                return


# --- tiles --------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def op_text(op: dict) -> str:
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in op.items() if k != "op")
    return f"{op.get('op', '?')}({params})"


def count_verdict(checks) -> tuple[bool | None, str]:
    """The count checker's verdict (True/False, or None when absent) and a short text."""
    check = None
    if isinstance(checks, dict):
        check = checks.get("count", checks.get("check_count"))
    if check is None:
        return None, ""
    if isinstance(check, bool):
        return check, "checker agrees" if check else "checker disagrees"
    if not isinstance(check, dict):
        return None, f"checker: {_fmt(check)}"
    verdict = None
    for k in ("exact", "pass", "passed", "ok", "agree"):
        if k in check:
            verdict = bool(check[k])
            break
    pred = next((check[k] for k in ("predicted", "pred", "estimate", "count", "value", "score") if k in check), None)
    text = "checker" + (f" {_fmt(pred)}" if pred is not None else "")
    if verdict is not None:
        text += " \u2713" if verdict else " \u2717"
    return verdict, text


def edit_text(edit) -> str:
    if not isinstance(edit, dict):
        return ""
    parts = [str(edit.get("kind", "edit"))]
    if "source_count" in edit or "target_count" in edit:
        parts.append(f"{edit.get('source_count', '?')}\u2192{edit.get('target_count', '?')}")
    if "attribute" in edit:
        parts.append(_fmt(edit["attribute"]))
    if "factor" in edit:  # a continuous control: what was asked and what the pixels show
        asked, seen = edit.get("requested", {}), edit.get("measured", {})
        parts.append(f"{edit['factor']} {_fmt(asked.get('change'))} asked, {_fmt(seen.get('change'))} measured")
    if "editor" in edit:
        parts.append(f"by {edit['editor']}")
    if "alpha" in edit:
        parts.append(f"\u03b1={_fmt(edit['alpha'])}")
    return "edit: " + " ".join(parts)


def _kv(obj) -> str:
    """A dict as escaped `name: value` lines (values compact JSON), anything else as compact JSON."""
    if isinstance(obj, dict):
        def one(v):
            if isinstance(v, dict):
                return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
            return _fmt(v)

        return "<br>".join(f"{esc(k)}: {esc(one(v))}" for k, v in obj.items())
    return esc(_fmt(obj))


def _decode_image(sample: dict) -> Image.Image | None:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            with Image.open(io.BytesIO(sample[ext])) as im:
                return im.convert("RGB")
    return None


def _mask_tile(sample: dict, meta: dict, image: Image.Image, big: Image.Image, key, problems: list) -> str:
    """The mask beside the image, or a note that the sample has none (generated and edited
    images drop theirs until a mask model supplies one)."""
    if MASK not in sample:
        return '<div class="mask nomask" title="this sample carries no instance mask">no mask</div>'
    try:
        mask = decode_mask(sample[MASK])
        points = meta.get("points")
        check_mask(mask, (image.size[1], image.size[0]), len(points) if isinstance(points, list) else None)
    except Exception as e:  # a bad mask shows as a problem line, not a failed page
        problems.append(f"bad mask: {e}")
        return ""
    n = len(np.unique(mask[mask > 0]))
    small = (max(1, big.size[0] // 2), max(1, big.size[1] // 2))
    return (f'<img class="mask" alt="mask of {esc(key)}" title="instance mask: {n} objects '
            f'(id i = the i-th point)" src="{data_uri(mask_image(mask, small))}">')


def render_tile(sample: dict) -> str:
    key = sample.get("__key__", "?")
    problems = []
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        if not isinstance(meta, dict):
            meta = {}
    except ValueError as e:
        meta = {}
        problems.append(f"unreadable json: {e}")
    key = meta.get("key", key)
    caption = meta.get("caption")
    if not caption and "txt" in sample:
        caption = sample["txt"].decode("utf-8", "replace")
    caption = caption or ""

    imgs = []
    try:
        image = _decode_image(sample)
    except Exception as e:  # a corrupt image shows as a broken tile, not a failed page
        image = None
        problems.append(f"unreadable image: {e}")
    if image is None:
        imgs.append('<div class="noimg">no image</div>')
        if not problems:
            problems.append("no image member")
    else:
        big, sx, sy = upscale(image)
        shown = annotate(big, sx, sy, meta.get("points"), meta.get("boxes"))
        imgs.append(f'<img class="img" alt="{esc(key)}" src="{data_uri(shown)}">')
        if "density.npy" in sample:
            try:
                den = np.load(io.BytesIO(sample["density.npy"]), allow_pickle=False)
                small = (max(1, big.size[0] // 2), max(1, big.size[1] // 2))
                imgs.append(f'<img class="density" alt="density of {esc(key)}" '
                            f'title="density map, sum {float(np.sum(den)):.2f}" src="{data_uri(heatmap(den, small))}">')
            except Exception as e:
                problems.append(f"unreadable density: {e}")
        imgs.append(_mask_tile(sample, meta, image, big, key, problems))

    lines = []
    verdict, vtext = count_verdict(meta.get("checks"))
    if "count" in meta:
        cls = {True: "ok", False: "bad", None: "plain"}[verdict]
        line = f'count <b>{esc(meta["count"])}</b>'
        if vtext:
            line += f' <span class="{cls}">{esc(vtext)}</span>'
        lines.append(f'<div class="count {cls}-tile">{line}</div>')
    elif vtext:
        lines.append(f'<div class="count">{esc(vtext)}</div>')
    if meta.get("edit"):
        lines.append(f'<div class="edit">{esc(edit_text(meta["edit"]))}</div>')
    lines.append(f'<div class="caption">{esc(caption)}</div>')
    for p in problems:
        lines.append(f'<div class="bad">{esc(p)}</div>')

    ops = meta.get("ops") or []
    chain = " > ".join(op_text(o) for o in ops if isinstance(o, dict)) or "(none: a real/world sample)"
    title = "\n".join([f"key: {key}", f"source: {meta.get('source_key', key)}", f"seed: {meta.get('seed', '?')}",
                       f"ops: {chain}"])
    rows = [("key", key), ("source key", meta.get("source_key", key)), ("seed", meta.get("seed", "?"))]
    details = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    op_items = "".join(f"<li>{esc(op_text(o))}</li>" for o in ops if isinstance(o, dict))
    details += f"<tr><th>ops</th><td>{'<ol>' + op_items + '</ol>' if op_items else '(none)'}</td></tr>"
    for name in ("checks", "edit", "attributes"):
        if meta.get(name):
            details += f"<tr><th>{name}</th><td>{_kv(meta[name])}</td></tr>"
    extra = {k: v for k, v in meta.items() if k not in {
        "key", "source_key", "seed", "caption", "ops", "checks", "edit", "attributes", "points", "boxes", "count"}}
    if extra:
        details += f"<tr><th>other</th><td>{_kv(extra)}</td></tr>"
    return (
        f'<div class="tile" id="{esc(key)}" title="{esc(title)}">'
        f'<div class="imgs">{"".join(imgs)}</div>'
        f'{"".join(lines)}'
        f'<details><summary>{esc(key)}</summary><table>{details}</table></details>'
        f'</div>'
    )


# --- page ---------------------------------------------------------------------

CSS = """
body{font:13px/1.35 system-ui,-apple-system,Segoe UI,sans-serif;margin:16px;background:#f4f4f4;color:#222}
header h1{font-size:18px;margin:0 0 4px}
header .meta{color:#555;margin-bottom:6px}
header .legend span{display:inline-block;margin-right:14px}
.sw{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin-right:4px;border:1px solid #000}
#show-density{margin-left:4px}
#show-density:not(:checked) ~ main .density{display:none}
#show-masks:not(:checked) ~ main .mask{display:none}
.nomask{width:96px;height:96px;background:#eee;color:#777;font-size:11px;display:flex;
  align-items:center;justify-content:center;text-align:center}
main{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
.tile{background:#fff;border:1px solid #ccc;border-radius:4px;padding:6px;width:min-content}
.imgs{display:flex;gap:4px;align-items:flex-start}
.imgs img{image-rendering:pixelated;display:block}
.noimg{width:192px;height:192px;background:#ddd;display:flex;align-items:center;justify-content:center}
.count{margin-top:4px}
.ok{color:#0a7a0a;font-weight:600}.bad{color:#c01010;font-weight:600}.plain{color:#555}
.bad-tile{background:#fde8e8}.ok-tile{background:#e8f6e8}
.edit{color:#6a3fa0}
.caption{color:#333;margin-top:2px;min-width:180px}
details{margin-top:4px;color:#444}
summary{cursor:pointer;font-family:ui-monospace,monospace;font-size:11px;word-break:break-all}
details table{border-collapse:collapse;font-size:11px}
details th{text-align:left;vertical-align:top;padding-right:6px;white-space:nowrap}
details td{font-family:ui-monospace,monospace;word-break:break-all}
details ol{margin:0;padding-left:16px}
"""


def _mask_swatch() -> str:
    """A CSS gradient of the background and the first three object colours, in quarters."""
    stops = [f"rgb{tuple(int(v) for v in c)} {25 * i}% {25 * (i + 1)}%" for i, c in enumerate(instance_colours(3))]
    return f"linear-gradient(90deg,{','.join(stops)})"


def render_page(url: str, recipe_name: str | None, tiles: list[str], total: int) -> str:
    name = recipe_name or "(no recipe name)"
    legend = (
        f'<span><i class="sw" style="background:rgb{BOX_COLOUR}"></i>boxes</span>'
        f'<span><i class="sw" style="background:rgb{POINT_COLOUR}"></i>points</span>'
        '<span><i class="sw" style="background:linear-gradient(90deg,#000004,#65156e,#ed6925,#fcffa4)"></i>'
        'density (normalised to its peak)</span>'
        f'<span><i class="sw" style="background:{_mask_swatch()}"></i>instance mask (a colour per object)</span>'
        '<span><b class="ok">\u2713</b>/<b class="bad">\u2717</b> count checker agrees/disagrees</span>'
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>gallery: {esc(name)} \u2014 {esc(url)}</title><style>{CSS}</style></head><body>\n"
        f"<header><h1>{esc(name)}</h1>"
        f'<div class="meta">folder <code>{esc(url)}</code> \u00b7 showing {len(tiles)} of {total} samples</div>'
        f'<div class="legend">{legend}</div></header>\n'
        '<input type="checkbox" id="show-density" checked><label for="show-density">show density maps</label>\n'
        '<input type="checkbox" id="show-masks" checked><label for="show-masks">show masks</label>\n'
        "<main>\n" + "\n".join(tiles) + "\n</main>\n</body></html>\n"
    )


def _recipe_name(manifest: dict) -> str | None:
    recipe = manifest.get("recipe") if isinstance(manifest, dict) else None
    if not isinstance(recipe, dict):
        return None
    if recipe.get("name"):
        return str(recipe["name"])
    if isinstance(recipe.get("world"), dict):
        return f"world export ({recipe['world'].get('split', '?')} split)"
    return None


def write_gallery(url: str, n: int = 64, html: str | None = None) -> str:
    """Write an HTML contact sheet of the first ``n`` samples of output ``url``; returns its path.

    The page goes to ``html`` (a path or fsspec URI) or, by default, ``url``/gallery.html.
    Raises FactoryError when ``n`` is not positive or ``url`` has no index.json.
    """
    out, index, manifest = _open_output(url, n)
    total = sum(int(s.get("nsamples", 0)) for s in index["shardlist"])
    tiles = [render_tile(s) for s in _iter_samples(out, url, index, n)]
    page = render_page(url, _recipe_name(manifest), tiles, total)
    if html is None:
        out.write_bytes(GALLERY, page.encode("utf-8"))
        path = out.path(GALLERY)
        return out.fs.unstrip_protocol(path) if "://" in url else path
    import fsspec

    with fsspec.open(html, "wb", auto_mkdir=True) as f:
        f.write(page.encode("utf-8"))
    return html
