"""`factory gallery`: the HTML contact sheet of an output folder."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from factory.errors import FactoryError
from factory.gallery import annotate, instance_colours, mask_image, upscale, write_gallery
from factory.masks import encode_mask
from factory.world.export import write_world_shards

DATA_URI = re.compile(r'<img class="(img|density|mask)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gallery") / "w"
    write_world_shards("train", 20, str(out), shard_size=8)
    return out


def labels_of(folder: Path, n: int) -> list[dict]:
    index = json.loads((folder / "index.json").read_text())
    out = []
    for shard in index["shardlist"]:
        for s in wds.WebDataset(str(folder / shard["url"]), shardshuffle=False, empty_check=False):
            out.append(json.loads(s["json"]))
    return out[:n]


def images(page: str, cls: str = "img") -> list[Image.Image]:
    out = []
    for kind, b64 in DATA_URI.findall(page):
        if kind == cls:
            im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
            assert im.format == "PNG"
            im.load()
            out.append(im)
    return out


def test_page_has_n_tiles_captions_keys_and_valid_images(world):
    path = write_gallery(str(world), n=10)
    assert path == str(world / "gallery.html")
    page = Path(path).read_text()
    assert page.count('class="tile"') == 10
    for meta in labels_of(world, 10):
        assert f">{meta['caption']}<" in page
        assert meta["key"] in page
        assert f"count <b>{meta['count']}</b>" in page
    assert "train_000010" not in page  # only the first n, in index order
    assert "showing 10 of 20 samples" in page
    assert "world export (train split)" in page
    imgs, dens = images(page, "img"), images(page, "density")
    assert len(imgs) == 10 and len(dens) == 10
    assert imgs[0].size == (192, 192)  # 64 px upscaled x3
    # No external resources: the page works copied alone.
    assert not re.search(r'src="(?!data:)', page)


def test_labels_are_drawn(world):
    page = Path(write_gallery(str(world), n=1, html=str(world.parent / "one.html"))).read_text()
    shown = np.asarray(images(page)[0].convert("RGB")).astype(int)
    meta = labels_of(world, 1)[0]
    first = next(iter(wds.WebDataset(str(world / "shard-000000.tar"), shardshuffle=False)))
    plain = np.asarray(Image.open(io.BytesIO(first["png"])).convert("RGB"))
    big, sx, sy = upscale(Image.fromarray(plain))
    sx, sy = int(sx), int(sy)
    plain_big = np.asarray(big).astype(int)
    assert (sx, sy) == (3, 3)
    x0, y0, x1, y1 = meta["boxes"][0]
    # The box's top edge, at its horizontal middle, differs from the plain upscaled image...
    xm = round((x0 + x1) / 2 * sx)
    assert np.abs(shown[y0 * sy, xm] - plain_big[y0 * sy, xm]).sum() > 0
    # ...and so does the point's centre.
    px, py = meta["points"][0]
    assert np.abs(shown[round(py * sy), round(px * sx)] - plain_big[round(py * sy), round(px * sx)]).sum() > 0
    # The annotation is deterministic and equals annotate() on the upscaled image.
    again = np.asarray(annotate(big, sx, sy, meta["points"], meta["boxes"])).astype(int)
    assert np.array_equal(again, shown)
    # Far from every label the pixels are the plain image's.
    assert np.array_equal(np.asarray(annotate(big, sx, sy, [], [])), np.asarray(big))


def test_n_larger_than_available_shows_all(world, tmp_path):
    page = Path(write_gallery(str(world), n=500, html=str(tmp_path / "sub" / "all.html"))).read_text()
    assert page.count('class="tile"') == 20
    assert "showing 20 of 20 samples" in page


def test_missing_index_and_bad_n_raise(tmp_path, world):
    with pytest.raises(FactoryError, match="no index.json"):
        write_gallery(str(tmp_path))
    with pytest.raises(FactoryError, match="--n"):
        write_gallery(str(world), n=0)


def test_ops_checks_edit_and_escaping(tmp_path):
    """A generated-looking sample: op chain, count checker verdicts, an edit, text needing escapes."""
    out = tmp_path / "gen"
    out.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, exact in enumerate([True, False]):
        img = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG")
        meta = {
            "key": f"s{i}", "source_key": f"train_00000{i}", "seed": 1234 + i,
            "caption": f"<b>{i}</b> apples & pears",
            "ops": [{"op": "render", "model": "tiny-sd", "steps": 4}, {"op": "edit", "alpha": 0.5}],
            "checks": {"count": {"predicted": 3 if exact else 5, "exact": exact}},
            "count": 3, "points": [[10.5, 10.5]], "boxes": [[4, 4, 20, 20]],
            "edit": {"kind": "count", "editor": "inpaint-x", "alpha": 0.5, "source_count": 4, "target_count": 3},
        }
        rows.append({"__key__": f"s{i}", "jpg": buf.getvalue(), "txt": meta["caption"].encode(),
                     "json": json.dumps(meta).encode()})
    with wds.TarWriter(str(out / "shard-000000.tar")) as w:
        for r in rows:
            w.write(r)
    (out / "index.json").write_text(json.dumps({"shardlist": [{"url": "shard-000000.tar", "nsamples": 2}]}))
    (out / "manifest.json").write_text(json.dumps({"recipe": {"name": "demo <x>"}}))
    page = Path(write_gallery(str(out))).read_text()
    assert page.count('class="tile"') == 2
    assert "&lt;b&gt;0&lt;/b&gt; apples &amp; pears" in page and "<b>0</b> apples" not in page
    assert "demo &lt;x&gt;" in page
    assert 'class="ok">checker 3 \u2713' in page and 'class="bad">checker 5 \u2717' in page
    assert "render(model=tiny-sd, steps=4)" in page and "edit(alpha=0.5)" in page
    assert "edit: count 4\u21923 by inpaint-x \u03b1=0.5" in page
    assert "train_000001" in page and "1235" in page
    assert images(page)[0].size == (192, 128)  # 48x32 upscaled x4
    assert images(page, "density") == [] and images(page, "mask") == []
    assert page.count(">no mask</div>") == 2  # generated images carry none: the tile says so


def test_masks_are_drawn_in_a_colour_per_object(world, tmp_path):
    from factory.world import make_scene

    page = Path(write_gallery(str(world), n=3, html=str(tmp_path / "m.html"))).read_text()
    shown = images(page, "mask")
    assert len(shown) == 3 and "no mask" not in page.split("<main>")[1]
    for i, im in enumerate(shown):
        scene = make_scene("train", i)
        assert im.size == (96, 96)  # beside the image, at half its size, as the density map
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(mask_image(scene.mask, (96, 96))))
        colours = {tuple(c) for c in np.asarray(im.convert("RGB")).reshape(-1, 3)}
        assert colours == {tuple(c) for c in instance_colours(scene.count)}  # one per object, and background
    assert 'title="instance mask: ' in page and "instance mask (a colour per object)" in page


def test_a_mask_that_contradicts_the_labels_is_reported_in_its_tile(world, tmp_path):
    from factory.world.export import scene_sample
    from factory.sample import encode_members

    out = tmp_path / "bad"
    out.mkdir()
    s = scene_sample("train", 0)
    members = encode_members(s)
    members["mask.png"] = encode_mask(np.full((64, 64), 40, np.uint8))
    with wds.TarWriter(str(out / "shard-000000.tar")) as w:
        w.write({"__key__": s.key, **members})
    (out / "index.json").write_text(json.dumps({"shardlist": [{"url": "shard-000000.tar", "nsamples": 1}]}))
    page = Path(write_gallery(str(out))).read_text()
    assert f"bad mask: mask names object 40, but the sample has {s.meta['count']} points" in page
    assert len(images(page)) == 1 and images(page, "mask") == []


def test_cli(world, tmp_path):
    exe = Path(sys.executable).parent / "factory"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "factory.cli"]
    env = {**os.environ, "COLUMNS": "200"}
    ok = subprocess.run([*cmd, "gallery", str(world), "--n", "16", "--html", str(tmp_path / "cli.html")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli.html").read_text().count('class="tile"') == 16
    bad = subprocess.run([*cmd, "gallery", str(tmp_path / "nothing"), "--n", "16"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr + bad.stdout
    assert "index.json" in bad.stderr + bad.stdout
