"""Caption swaps and CLIP scores on a randomly initialised tiny OpenCLIP (the real code path)."""
import numpy as np
import pytest
from pydantic import ValidationError

from actors.captioners import CaptionSwapParams, CaptionSwapper, TextEncoder
from actors.checkers import ClipScoreChecker
from factory.evaluation.fidelity import heldout_layouts

POOL = [{"kind": "world", "split": "train", "n": 60}]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from factory.models import tiny_clip

    d = tmp_path_factory.mktemp("clip")
    model, _, _ = tiny_clip.create(d, seed=0)
    tiny_clip.save(model, d)
    return d


def swapper(clip_dir, **kw):
    params = {"encoder": f"openclip:{clip_dir}", "pool": POOL, **kw}
    return CaptionSwapper(params, "cpu")


def test_p_zero_never_swaps_and_p_one_always_does(clip_dir):
    samples = heldout_layouts(20)
    swapper(clip_dir, p=0.0).process(samples)
    assert not any(s.meta["caption_swap"]["swapped"] for s in samples)
    samples = heldout_layouts(20)
    originals = [s.meta["caption"] for s in samples]
    swapper(clip_dir, p=1.0, threshold=-1.0, random_swap=True).process(samples)
    for s, orig in zip(samples, originals):
        rec = s.meta["caption_swap"]
        assert rec["swapped"] and rec["original"] == orig and s.meta["caption"] == rec["caption"] != orig
        assert s.meta["ops"][-1]["op"] == "swap_caption"


def test_swaps_respect_the_threshold(clip_dir):
    sw = swapper(clip_dir, p=1.0, threshold=0.7)
    samples = heldout_layouts(30)
    sw.process(samples)
    emb = TextEncoder(f"openclip:{clip_dir}")
    for s in samples:
        rec = s.meta["caption_swap"]
        if rec["swapped"]:
            a, b = emb([rec["original"], rec["caption"]])
            assert float(a @ b) > 0.7 and abs(float(a @ b) - rec["similarity"]) < 1e-3
        else:
            assert rec.get("no_candidate") and s.meta["caption"] == rec["original"]


def test_swaps_are_deterministic_per_sample_seed(clip_dir):
    a, b = heldout_layouts(15), heldout_layouts(15)
    sw = swapper(clip_dir, p=0.5, threshold=-1.0, random_swap=True)
    sw.process(a)
    sw.process(b[::-1])
    assert [s.meta["caption"] for s in a] == [s.meta["caption"] for s in b]


def test_random_swap_must_be_explicit(clip_dir):
    with pytest.raises(ValidationError, match="random_swap"):
        CaptionSwapParams(threshold=0.0, encoder=f"openclip:{clip_dir}")
    with pytest.raises(ValidationError, match="openclip:MODEL"):
        CaptionSwapParams(encoder="word2vec:x")


def test_clip_score_is_stored_and_can_filter(clip_dir):
    samples = heldout_layouts(4)
    ClipScoreChecker({"model": str(clip_dir), "min_score": 1.0}, "cpu").process(samples)
    for s in samples:
        assert -1 <= s.meta["checks"]["clip"]["score"] <= 1
        assert not s.alive and "CLIP score" in s.meta["filtered"]["reason"]
