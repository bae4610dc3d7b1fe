"""The streamed plan, shard ranges, staged shards, leases and output URLs: no Ray needed."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest

from conftest import ROOT, factory_cli, write_recipe
from factory.errors import FactoryError
from factory.lease import STALE_S, Lease, read_leases
from factory.listing import ShardsTable
from factory.plan import make_key, make_plan, parse_shard_range
from factory.recipe import ShardsSource, load_recipe
from factory.sample import encode_members, sample_seed
from factory.shards import OutputDir, ShardAssembler, open_filesystem, write_shard
from factory.sources import list_source
from factory.staging import StagedShard, write_piece
from factory.world.export import scene_sample, write_world_shards


def _whole_table(recipe):
    """The plan as the driver used to build it: every ref listed, every row made at once."""
    refs = [r for spec in recipe.sources for r in list_source(spec)[0]]
    rows, size = [], recipe.output.shard_size
    for ref in refs:
        for v in range(recipe.variants):
            n = len(rows)
            key = make_key(ref.id, recipe.op, v)
            rows.append((key, sample_seed(recipe.seed, key), n // size, n % size, ref.where, v))
    return rows


def test_streamed_rows_equal_the_whole_table(tmp_path):
    write_world_shards("train", 11, str(tmp_path / "src"), start=100, shard_size=4)
    recipe = load_recipe(write_recipe(
        tmp_path / "r.yaml", variants=3, output={"shard_size": 7},
        sources=[{"kind": "world", "split": "train", "n": 5},
                 {"kind": "shards", "path": str(tmp_path / "src"), "limit": 9},
                 {"kind": "latents", "n": 4, "start": 3}]))
    plan = make_plan(recipe)
    whole = _whole_table(recipe)
    assert plan.total == len(whole) == 3 * (5 + 9 + 4) and plan.num_shards == -(-len(whole) // 7)
    streamed = [(it.key, it.seed, it.shard, it.pos, it.source.where, it.variant)
                for s in range(plan.num_shards) for it in plan.shard_rows(s)]
    assert streamed == whole
    assert [plan.shard_len(s) for s in range(plan.num_shards)] == [7] * 7 + [54 - 49]
    for start, stop in ((0, 1), (13, 31), (40, 54), (53, 99)):  # windows across sources and tars
        assert [it.key for it in plan.rows(start, stop)] == [r[0] for r in whole[start:stop]]


def test_a_shard_folder_is_counted_a_tar_at_a_time(tmp_path):
    write_world_shards("test", 10, str(tmp_path / "src"), shard_size=4)
    table = ShardsTable(ShardsSource(kind="shards", path=str(tmp_path / "src")))
    assert len(table) == 10 and table.starts == [0, 4, 8, 10]  # one number per tar, no refs kept
    refs = table.refs(3, 9)  # spans three tars, each listed again only now
    assert [r.id for r in refs] == [f"test_{i:06d}" for i in range(3, 9)]
    assert refs[0].where["url"].endswith("shard-000000.tar") and refs[-1].where["url"].endswith("shard-000002.tar")


@pytest.mark.parametrize("sources", [
    [{"kind": "world", "n": 10}, {"kind": "world", "n": 10, "start": 5, "world_seed": 1}],
    [{"kind": "world", "n": 4}, {"kind": "shards", "path": "SRC"}],
    [{"kind": "shards", "path": "SRC"}, {"kind": "shards", "path": "SRC"}],
])
def test_duplicate_source_ids_are_refused(tmp_path, sources):
    write_world_shards("train", 6, str(tmp_path / "src"), shard_size=4)
    for s in sources:
        if s.get("path") == "SRC":
            s["path"] = str(tmp_path / "src")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", sources=sources))
    with pytest.raises(FactoryError, match="source ids occur more than once .*train_00000"):
        make_plan(recipe)


def test_shard_ranges():
    assert parse_shard_range(None, 6) == range(6)
    assert parse_shard_range("2:4", 6) == range(2, 4)
    assert parse_shard_range(":2", 6) == range(0, 2) and parse_shard_range("4:", 6) == range(4, 6)
    for text, words in (("4:2", "reversed"), ("3:3", "empty"), ("0:7", "out of range.*6 shards"),
                        ("-1:2", "start at 0"), ("2", "not a range"), ("a:b", "not a range")):
        with pytest.raises(FactoryError, match=words):
            parse_shard_range(text, 6)


def test_a_shard_written_from_staged_pieces_equals_one_written_in_one_process(tmp_path):
    """Pieces arrive in any order, from any batch; the tar is byte-identical to the driver's."""
    samples = [scene_sample("train", i) for i in range(7)]
    rows = [(i, s.key, encode_members(s), {}) for i, s in enumerate(samples)]
    rows[3] = (3, samples[3].key, None, {"filtered": {"stage": "check_count", "reason": "count 5 differs"}})
    ref = OutputDir(str(tmp_path / "ref"))
    ref.fs.makedirs(ref.root, exist_ok=True)
    writer = ShardAssembler(ref, {0: 7}, "png")
    for r in reversed(rows):
        writer.add(0, *r)
    out = OutputDir(str(tmp_path / "out"))
    out.fs.makedirs(out.root, exist_ok=True)
    write_piece(out, 0, [rows[5], rows[6]])
    write_piece(out, 0, [rows[0], rows[2], rows[3]])
    write_piece(out, 0, [rows[1], rows[4]])
    write_piece(out, 0, [rows[1], rows[4]])  # a retried batch writes the same piece again
    staged = StagedShard(out, 0)
    assert staged.missing(7) == [] and staged.missing(8) == [7]
    stats = write_shard(out, 0, staged.rows(7), time.time())
    assert stats["generated"] == 6 and stats["filtered"] == {"check_count: count N differs": 1}
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == (tmp_path / "ref" / "shard-000000.tar").read_bytes()


# --- leases ------------------------------------------------------------------

def _out(tmp_path) -> OutputDir:
    out = OutputDir(str(tmp_path / "out"))
    out.fs.makedirs(out.root, exist_ok=True)
    return out


def test_leases_of_overlapping_ranges_exclude_each_other(tmp_path):
    out = _out(tmp_path)
    a = Lease.acquire(out, range(0, 3))
    b = Lease.acquire(out, range(3, 6))  # disjoint ranges: one recipe split across jobs
    with pytest.raises(FactoryError) as e:
        Lease.acquire(out, range(2, 4))
    msg = str(e.value)
    assert a.record.run_id in msg and b.record.run_id in msg and socket.gethostname() in msg
    assert "shards 0:3" in msg and "Nothing was written" in msg
    assert {r.run_id for r in read_leases(out)} == {a.record.run_id, b.record.run_id}  # the refused one left none
    a.release()
    c = Lease.acquire(out, range(1, 3))
    for lease in (b, c):
        lease.release()
    assert read_leases(out) == []


def test_a_stale_lease_is_taken_over_saying_so(tmp_path):
    out = _out(tmp_path)
    held = Lease.acquire(out, range(0, 6))
    held._stop.set()  # its heartbeat stops, as if its host went away ...
    record = dict(json.loads((tmp_path / "out" / "_leases" / f"{held.record.run_id}.json").read_text()))
    record.update(host="elsewhere", heartbeat=time.time() - STALE_S - 5)
    (tmp_path / "out" / "_leases" / f"{held.record.run_id}.json").write_text(json.dumps(record))
    notes = []
    taker = Lease.acquire(out, range(4, 8), notify=notes.append)
    assert len(notes) == 1 and "took over the stale lease" in notes[0] and "elsewhere" in notes[0]
    assert f"{STALE_S:.0f} s" in notes[0]
    # ... and a lease of a process that is gone from this host needs no wait.
    dead = dict(record, run_id="deadbeef0000", host=socket.gethostname(), pid=2 ** 22 + 7,
                heartbeat=time.time(), first=10, stop=12)
    (tmp_path / "out" / "_leases" / "deadbeef0000.json").write_text(json.dumps(dead))
    notes.clear()
    Lease.acquire(out, range(10, 11), notify=notes.append).release()
    assert "is gone" in notes[0]
    taker.release()


def test_a_live_lease_refuses_a_run_before_it_writes(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"recipe_hash": recipe.content_hash()}))
    lease = Lease.acquire(OutputDir(str(out)), range(0, 6))
    (out / "shard-000002.tar.tmp").write_bytes(b"the live run's half shard")
    before = sorted(p.name for p in out.rglob("*"))
    from factory.pipeline import run

    with pytest.raises(FactoryError, match="being written by a live run"):
        run(recipe, str(out), shards="2:3")
    assert sorted(p.name for p in out.rglob("*")) == before  # its temporary file was not cleaned up
    lease.release()


# --- output URLs and bad input -----------------------------------------------

def test_an_output_filesystem_that_is_not_installed_names_the_package():
    with pytest.raises(FactoryError, match="pip install s3fs"):
        open_filesystem("s3://bucket/datasets/demo")
    with pytest.raises(FactoryError, match="no fsspec filesystem is known for nope://"):
        open_filesystem("nope://x/y")


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    from factory.cli import main

    recipe = write_recipe(tmp_path / "r.yaml")  # 60 samples, 6 shards
    out = tmp_path / "out"
    # The command line itself once (exit code, no traceback), the rest through main() in this
    # process: each subprocess spent about 4 s importing the package again.
    res = factory_cli("run", recipe, "--out", "s3://bucket/demo")
    assert res.returncode == 2 and "pip install s3fs" in res.stderr and "Traceback" not in res.stderr
    for args, words in ((["--shards", "4:9"], "out of range"), (["--shards", "5:2"], "reversed")):
        assert main(["run", str(recipe), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
        assert not out.exists()
    assert main(["plan", str(recipe), "--shards", "6:7"]) == 2
    assert "the plan has 6 shards" in capsys.readouterr().err
    assert main(["submit", str(ROOT / "tests/data/tiny.yaml"), "--address", "http://127.0.0.1:1", "--out", str(out),
                 "--shards", "1:3"]) == 2  # checked here, before any cluster is asked
    err = capsys.readouterr().err
    assert "the plan has 2 shards" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["r.yaml"]


def test_model_stages_declare_their_memory_and_requests_fit_the_cluster():
    from factory.pipeline import memory_scale
    from factory.stage import get_stage

    for name in ("caption", "swap_caption", "generate", "check_count", "check_clip", "sample_latent", "edit",
                 "invert", "check_edit"):
        assert get_stage(name).resources.memory >= 2 ** 30, name  # measured: 0.9-1.3 GB each, +25 %
    assert memory_scale([2 ** 30] * 4, 2 * 2 ** 30) == 0.5  # a small machine: scaled down together
    assert memory_scale([2 ** 30] * 4, 64 * 2 ** 30) == 1.0 and memory_scale([0, 0], 2 ** 30) == 1.0
