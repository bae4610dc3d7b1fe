"""Loaders: every sample once (workers, ranks, fewer shards than readers), labels
decoded right, real/synthetic mixing, and the shards read by standard consumers."""
from __future__ import annotations

import copy
import glob
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from factory.loaders import (
    MixingDataset,
    ShardDataset,
    VariantIndex,
    assign_shards,
    collate,
    make_loader,
    shard_urls,
)
from factory.sample import encode_members
from factory.shards import OutputDir, ShardAssembler
from factory.world.export import scene_sample, write_world_shards

N_REAL = 200


def variants_of(i: int) -> int:
    """Synthetic variants of real scene i in the fixture: none for every tenth."""
    return 0 if i % 10 == 9 else 1 + i % 3


def write_variants(out: str, n_real: int, shard_size: int) -> list[str]:
    """Synthetic-looking shards without Ray: real scenes under variant keys (flipped,
    source_key kept), variant v of every source in a later shard than variant v-1."""
    samples = []
    for v in range(3):
        for i in range(n_real):
            if v >= variants_of(i):
                continue
            s = copy.deepcopy(scene_sample("train", i))
            s.key = f"{s.key}-test-{v:02d}"
            s.image = np.ascontiguousarray(s.image[:, ::-1])
            s.density = np.ascontiguousarray(s.density[:, ::-1])
            s.mask = np.ascontiguousarray(s.mask[:, ::-1])
            s.add_op("test_flip", variant=v)
            samples.append(s)
    outdir = OutputDir(out)
    outdir.fs.makedirs(outdir.root, exist_ok=True)
    num_shards = (len(samples) + shard_size - 1) // shard_size
    expected = {k: min(shard_size, len(samples) - k * shard_size) for k in range(num_shards)}
    writer = ShardAssembler(outdir, expected, "png")
    for pos, s in enumerate(samples):
        writer.add(pos // shard_size, pos % shard_size, s.key, encode_members(s), {})
    outdir.write_index(num_shards)
    return [s.key for s in samples]


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("loaders") / "real")
    write_world_shards("train", N_REAL, out, shard_size=50)  # 4 shards
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("loaders") / "synthetic")
    write_variants(out, N_REAL, shard_size=100)
    return out


@pytest.fixture(scope="session")
def one_shard_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("loaders") / "one")
    write_world_shards("test", 30, out, shard_size=100)
    return out


def real_keys(n: int = N_REAL, split: str = "train") -> set[str]:
    return {f"{split}_{i:06d}" for i in range(n)}


def keys_through(dataset, num_workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=16, num_workers=num_workers, collate_fn=collate)
    return [k for batch in loader for k in batch["key"]]


def set_reader(monkeypatch, rank: int, world: int, worker: int, workers: int) -> None:
    # webdataset's pytorch_worker_info reads these before torch.distributed and the DataLoader
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("WORKER", worker), ("NUM_WORKERS", workers)):
        monkeypatch.setenv(name, str(value))


# --- ShardDataset ----------------------------------------------------------------

def test_sources_index_list_and_pattern(real_dir):
    urls, n = shard_urls(real_dir)
    assert n == N_REAL and len(urls) == 4 and all(u.endswith(".tar") for u in urls)
    assert shard_urls(f"{real_dir}/index.json") == (urls, N_REAL)
    assert shard_urls(urls) == (urls, None)
    assert shard_urls(f"{real_dir}/shard-{{000000..000003}}.tar")[0] == urls
    assert ShardDataset(real_dir).nsamples == N_REAL


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once(real_dir, num_workers):
    keys = keys_through(ShardDataset(real_dir), num_workers)
    assert len(keys) == N_REAL
    assert set(keys) == real_keys()


def test_fewer_shards_than_workers(one_shard_dir):
    keys = keys_through(ShardDataset(one_shard_dir), num_workers=2)
    assert Counter(keys) == Counter(real_keys(30, "test"))


@pytest.mark.parametrize("world,workers", [(1, 3), (2, 2), (3, 1), (2, 3), (5, 1)])
@pytest.mark.parametrize("which", ["real", "one"])
def test_readers_split_samples_exactly(monkeypatch, real_dir, one_shard_dir, world, workers, which):
    folder, expected = (real_dir, real_keys()) if which == "real" else (one_shard_dir, real_keys(30, "test"))
    ds = ShardDataset(folder, shuffle=20)
    seen = Counter()
    for rank in range(world):
        for worker in range(workers):
            set_reader(monkeypatch, rank, world, worker, workers)
            seen.update(s["__key__"] for s in ds.raw_samples())
    assert seen == Counter(expected)


def test_assign_shards_uses_whole_shards_when_enough(monkeypatch):
    urls = [f"s{i}.tar" for i in range(6)]
    set_reader(monkeypatch, 1, 2, 1, 2)  # reader 3 of 4
    assert assign_shards(urls) == [("s3.tar", 1, 0)]  # islice by rank, then by worker
    set_reader(monkeypatch, 1, 2, 2, 3)  # reader 5 of 6
    assert assign_shards(urls[:2]) == [("s1.tar", 3, 2)]


def test_labels_decode(real_dir):
    samples = list(ShardDataset(real_dir))
    for s in samples:
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 64, 64)
        assert 0.0 <= float(s["image"].min()) and float(s["image"].max()) <= 1.0
        assert s["density"].shape == (64, 64) and s["density"].dtype == torch.float32
        assert isinstance(s["count"], int) and 1 <= s["count"] <= 12
        assert float(s["density"].sum()) == pytest.approx(s["count"], abs=1e-3)
        assert s["points"].shape == (s["count"], 2)
        assert s["boxes"].shape == (s["count"], 4)
        assert s["mask"].shape == (64, 64) and s["mask"].dtype == torch.long
        assert s["mask"].unique().tolist() == list(range(s["count"] + 1))
        assert s["source_key"] == s["key"] == s["json"]["key"]
        assert s["caption"] and s["caption"] == s["json"]["caption"]
        assert s["attributes"]["object_colour"] in s["caption"]
    # the points and the mask decoded are the scene's
    first = scene_sample("train", 0)
    assert samples[0]["points"].tolist() == first.meta["points"]
    assert np.array_equal(samples[0]["mask"].numpy(), first.mask)


def test_decode_density_off_and_transform(real_dir):
    def half(sample):
        sample["image"] = sample["image"][:, ::2, ::2]
        return sample

    s = next(iter(ShardDataset(real_dir, decode_density=False, transform=half)))
    assert "density" not in s and s["image"].shape == (3, 32, 32) and "count" in s


def test_shuffle_is_deterministic_per_seed_and_epoch(real_dir):
    plain = [s["__key__"] for s in ShardDataset(real_dir).raw_samples()]
    ds = ShardDataset(real_dir, shuffle=50, seed=3)
    a = [s["__key__"] for s in ds.raw_samples()]
    b = [s["__key__"] for s in ShardDataset(real_dir, shuffle=50, seed=3).raw_samples()]
    ds.set_epoch(1)
    c = [s["__key__"] for s in ds.raw_samples()]
    assert a == b and a != plain and c != a
    assert sorted(a) == sorted(plain) == sorted(c)


def test_collate():
    def fake(h, w, count):
        return {"image": torch.zeros(3, h, w), "density": torch.zeros(h, w), "count": count,
                "mask": torch.zeros(h, w, dtype=torch.long),
                "points": torch.zeros(count, 2), "key": f"k{count}", "synthetic": count % 2 == 0}

    batch = collate([fake(8, 8, 1), fake(8, 8, 3)])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["density"].shape == (2, 8, 8)
    assert batch["mask"].shape == (2, 8, 8) and batch["mask"].dtype == torch.long
    assert batch["count"].tolist() == [1, 3] and batch["count"].dtype == torch.long
    assert batch["synthetic"].tolist() == [False, False]
    assert [p.shape[0] for p in batch["points"]] == [1, 3] and batch["key"] == ["k1", "k3"]
    mixed = collate([fake(8, 8, 1), fake(4, 6, 2)])
    assert isinstance(mixed["image"], list) and mixed["image"][1].shape == (3, 4, 6)
    assert isinstance(mixed["mask"], list) and mixed["mask"][1].shape == (4, 6)
    no_count = collate([fake(8, 8, 1), {"image": torch.zeros(3, 8, 8), "key": "x"}])
    assert no_count["count"] == [1, None] and no_count["image"].shape == (2, 3, 8, 8)
    assert isinstance(no_count["density"], list) and no_count["mask"][1] is None  # a sample without a mask


def test_fsspec_uri(real_dir, synth_dir):
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.put(real_dir, "/loaders-real", recursive=True)
    mem.put(synth_dir, "/loaders-synth", recursive=True)
    try:
        keys = [s["key"] for s in ShardDataset("memory://loaders-real")]
        assert sorted(keys) == sorted(real_keys())
        mixed = list(MixingDataset("memory://loaders-real", "memory://loaders-synth", p0=1.0))
        assert sum(s["synthetic"] for s in mixed) == sum(variants_of(i) > 0 for i in range(N_REAL))
    finally:
        mem.rm("/loaders-real", recursive=True)
        mem.rm("/loaders-synth", recursive=True)


# --- mixing ------------------------------------------------------------------

def has_variants(key: str) -> bool:
    return variants_of(int(key.split("_")[1])) > 0


def test_variant_index(synth_dir):
    index = VariantIndex(shard_urls(synth_dir)[0])
    assert len(index) == sum(variants_of(i) for i in range(N_REAL))
    for i in (0, 1, 2, 9):
        assert index.count(f"train_{i:06d}") == variants_of(i)
    assert {index.shard.dtype, index.start.dtype} == {np.dtype(np.int64)}
    raw = index.load("train_000002", 2)
    assert raw["__key__"] == "train_000002-test-02"
    assert set(raw) >= {"png", "json", "txt", "density.npy", "__url__"}
    assert json.loads(raw["json"])["source_key"] == "train_000002"


def test_mixing_p0_zero_is_all_real(real_dir, synth_dir):
    out = list(MixingDataset(real_dir, synth_dir, p0=0.0))
    assert not any(s["synthetic"] for s in out)
    assert sorted(s["key"] for s in out) == sorted(real_keys())


def test_mixing_p0_one_replaces_whenever_a_variant_exists(real_dir, synth_dir):
    out = list(MixingDataset(real_dir, synth_dir, p0=1.0))
    assert Counter(s["source_key"] for s in out) == Counter(real_keys())
    for s in out:
        assert s["synthetic"] == has_variants(s["source_key"])
        if s["synthetic"]:
            assert s["key"].startswith(s["source_key"] + "-test-")
            assert s["json"]["ops"][-1]["op"] == "test_flip"
            assert float(s["density"].sum()) == pytest.approx(s["count"], abs=1e-3)
            # the variant's own (mirrored) mask, not its source's
            source = scene_sample("train", int(s["source_key"].split("_")[1]))
            assert np.array_equal(s["mask"].numpy(), source.mask[:, ::-1])
    # different real samples pick different variant numbers
    assert len({s["key"].rsplit("-", 1)[1] for s in out if s["synthetic"]}) == 3


def test_mixing_half(real_dir, synth_dir):
    out = list(MixingDataset(real_dir, synth_dir, p0=0.5, seed=1))
    assert Counter(s["source_key"] for s in out) == Counter(real_keys())
    eligible = [s for s in out if has_variants(s["source_key"])]
    replaced = [s for s in eligible if s["synthetic"]]
    assert 0.35 <= len(replaced) / len(eligible) <= 0.65
    for s in out:
        if s["synthetic"]:
            assert s["key"] != s["source_key"] and s["key"].startswith(s["source_key"] + "-")
        else:
            assert s["key"] == s["source_key"]


def choices(ds) -> list[tuple[str, str]]:
    return sorted((s["source_key"], s["key"]) for s in ds)


def test_mixing_is_deterministic(real_dir, synth_dir):
    a = MixingDataset(real_dir, synth_dir, p0=0.5, seed=7)
    first = choices(a)
    assert first == choices(MixingDataset(real_dir, synth_dir, p0=0.5, seed=7))
    assert first != choices(MixingDataset(real_dir, synth_dir, p0=0.5, seed=8))
    a.set_epoch(1)
    assert choices(a) != first
    a.set_epoch(0)
    assert choices(a) == first
    # independent of shuffling
    assert choices(MixingDataset(real_dir, synth_dir, p0=0.5, seed=7, shuffle=30)) == first


def test_mixing_with_workers(real_dir, synth_dir):
    ds = MixingDataset(real_dir, synth_dir, p0=0.5, seed=7)
    loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=collate)
    got = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 64, 64) and batch["synthetic"].dtype == torch.bool
        assert batch["mask"].shape == (len(batch["key"]), 64, 64)
        got += list(zip(batch["source_key"], batch["key"]))
    assert sorted(got) == choices(ds)


@pytest.mark.parametrize("p0", [1.5, -0.1, float("nan"), "half"])
def test_bad_p0(real_dir, synth_dir, p0):
    with pytest.raises(ValueError, match=r"p0 must be a probability in \[0, 1\]"):
        MixingDataset(real_dir, synth_dir, p0=p0)


def test_make_loader(real_dir, synth_dir):
    loader = make_loader(real_dir, synth_dir, p0=0.5, batch_size=32, num_workers=0, seed=7)
    assert isinstance(loader, DataLoader) and isinstance(loader.dataset, MixingDataset)
    batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == N_REAL
    assert batches[0]["image"].shape == (32, 3, 64, 64) and batches[0]["count"].shape == (32,)
    plain = make_loader(real_dir, batch_size=50)
    assert isinstance(plain.dataset, ShardDataset) and len(list(plain)) == 4


# --- standard consumers ------------------------------------------------------

def test_webdataset_reads_shards_unchanged(real_dir, synth_dir):
    for folder in (real_dir, synth_dir):
        urls, n = shard_urls(folder)
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb"))
        assert len(samples) == n
        s = samples[0]
        assert s["png"].shape == (64, 64, 3) and s["png"].dtype == np.float32
        assert s["txt"] == s["json"]["caption"]
        assert s["density.npy"].sum() == pytest.approx(s["json"]["count"], abs=1e-3)
        assert s["mask.png"].shape[:2] == (64, 64)  # a PNG to them: decoded, not in the way


def test_webloader(real_dir):
    urls, _ = shard_urls(real_dir)
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)
          .decode("torchrgb").to_tuple("png", "json", "__key__").batched(16))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=2)
    keys = []
    for images, labels, batch_keys in loader:
        assert images.shape[1:] == (3, 64, 64)
        assert all(label["key"] == k for label, k in zip(labels, batch_keys))
        keys += batch_keys
    assert Counter(keys) == Counter(real_keys())


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_ray_read_webdataset(ray_session, real_dir, synth_dir):
    for folder in (real_dir, synth_dir):
        paths = sorted(glob.glob(f"{folder}/*.tar"))
        rows = ray_session.data.read_webdataset(paths).take_all()
        assert len(rows) == shard_urls(folder)[1]
        row = rows[0]
        assert row["png"].shape == (64, 64, 3) and row["png"].dtype == np.uint8
        assert row["json"]["source_key"] in row["__key__"]
        assert float(row["density.npy"].sum()) == pytest.approx(row["json"]["count"], abs=1e-3)
        assert row["txt"] == row["json"]["caption"]
        assert row["mask.png"].shape[:2] == (64, 64) and int(row["mask.png"].max()) == row["json"]["count"]


@pytest.mark.slow
def test_mixing_pipeline_output(ray_session, tmp_path):
    """The factory's own synthetic output, mixed with the real scenes it came from."""
    import yaml

    from factory.pipeline import run
    from factory.recipe import parse_recipe

    data = yaml.safe_load(Path(__file__).parent.parent.joinpath("recipes/demo.yaml").read_text())
    data["sources"][0]["n"] = 12
    data["variants"] = 2
    data["output"]["shard_size"] = 10
    run(parse_recipe(data), str(tmp_path / "synthetic"), num_cpus=1)
    write_world_shards("train", 12, str(tmp_path / "real"), shard_size=5)
    out = list(MixingDataset(str(tmp_path / "real"), str(tmp_path / "synthetic"), p0=1.0))
    assert Counter(s["source_key"] for s in out) == Counter(real_keys(12))
    assert sum(s["synthetic"] for s in out) >= 10  # only a sample whose variants were all filtered stays real
    for s in out:
        if s["synthetic"]:
            assert s["key"].startswith(s["source_key"] + "-render-")
            assert float(s["density"].sum()) == pytest.approx(s["count"], abs=1e-3)
