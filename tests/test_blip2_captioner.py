"""The BLIP-2 captioner stage on a randomly initialised microscopic BLIP-2 (the real code path)."""
import pytest
from pydantic import ValidationError

from actors.captioners import Blip2Captioner, CaptionerParams
from factory.evaluation.fidelity import heldout_layouts


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from factory.models.tiny_blip2 import build_tiny_blip2

    d = tmp_path_factory.mktemp("blip2")
    build_tiny_blip2(d, seed=0)
    return d


@pytest.fixture(scope="module")
def captioner(blip2_dir):
    return Blip2Captioner({"model": str(blip2_dir), "max_new_tokens": 5}, "cpu")


@pytest.fixture(scope="module")
def prompted(blip2_dir):
    return Blip2Captioner({"model": str(blip2_dir), "max_new_tokens": 5, "prompt": "a photo of"}, "cpu")


def uncaptioned(n=4, start=0):
    samples = heldout_layouts(n, start)
    for s in samples:
        s.meta["caption"] = ""
    samples[1].meta["source_key"] = samples[0].meta["source_key"]  # two variants of one source
    return samples


def count_images(stage, monkeypatch):
    """Wrap ``stage._caption`` (one generate call per batch) and count the images it captions."""
    seen = []
    real = stage._caption

    def wrapped(images):
        seen.append(len(images))
        return real(images)

    monkeypatch.setattr(stage, "_caption", wrapped)
    return seen


def spy_generate(stage, monkeypatch):
    calls = []
    real = stage.model.generate

    def wrapped(**kw):
        out = real(**kw)
        calls.append((kw, out))
        return out

    monkeypatch.setattr(stage.model, "generate", wrapped)
    return calls


def test_captions_once_per_source_key(blip2_dir, monkeypatch):
    stage = Blip2Captioner({"model": str(blip2_dir), "max_new_tokens": 5}, "cpu")
    seen = count_images(stage, monkeypatch)
    samples = uncaptioned()
    stage.process(samples)
    assert seen == [3]  # 4 samples, 3 distinct source keys, one batched generate
    for s in samples:
        assert isinstance(s.meta["caption"], str)
        op = s.meta["ops"][-1]
        assert op["op"] == "caption" and op["model"] == str(blip2_dir)
    assert samples[0].meta["caption"] == samples[1].meta["caption"]
    again = uncaptioned()  # the same sources in a later batch: served from the cache
    stage.process(again)
    assert seen == [3]
    assert [s.meta["caption"] for s in again] == [s.meta["caption"] for s in samples]


def test_image_tokens_reach_the_model_and_the_output_is_only_new_text(captioner, monkeypatch):
    calls = spy_generate(captioner, monkeypatch)
    samples = uncaptioned()
    captioner.process(samples)
    (kw, out), = calls
    cfg = captioner.model.config
    assert kw["pixel_values"].dtype == captioner.dtype and "input_ids" not in kw
    n_in = cfg.num_query_tokens + 1  # generate's own image tokens + BOS
    assert (out[:, : cfg.num_query_tokens] == cfg.image_token_index).all()
    assert out.shape[1] - n_in <= 5
    tok = captioner.processor.tokenizer
    want = [tok.decode(row[n_in:], skip_special_tokens=True).strip() for row in out]
    assert [s.meta["caption"] for s in samples if s is not samples[1]] == want


def test_prompted_generation_strips_the_prompt(prompted, monkeypatch):
    calls = spy_generate(prompted, monkeypatch)
    samples = uncaptioned()
    prompted.process(samples)
    (kw, out), = calls
    cfg = prompted.model.config
    ids = kw["input_ids"]
    assert not ids.is_floating_point() and kw["pixel_values"].is_floating_point()
    assert (ids[:, : cfg.num_query_tokens] == cfg.image_token_index).all()  # the processor expanded <image>
    tok = prompted.processor.tokenizer
    assert tok.decode(ids[0], skip_special_tokens=True) == "a photo of"
    assert (out[:, : ids.shape[1]] == ids).all()  # generate returns the prompt ...
    assert 0 < out.shape[1] - ids.shape[1] <= 5
    want = [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]
    assert [s.meta["caption"] for s in samples if s is not samples[1]] == want  # ... the caption does not
    assert all(isinstance(s.meta["caption"], str) for s in samples)
    assert samples[0].meta["caption"] == samples[1].meta["caption"]


def test_existing_captions_are_kept_when_only_missing(captioner, monkeypatch):
    seen = count_images(captioner, monkeypatch)
    samples = heldout_layouts(4, start=10)
    originals = [s.meta["caption"] for s in samples]
    assert all(originals)
    samples[2].meta["caption"] = ""
    captioner.process(samples)
    assert seen == [1]
    for i, (s, orig) in enumerate(zip(samples, originals)):
        if i == 2:
            assert isinstance(s.meta["caption"], str) and s.meta["ops"][-1]["op"] == "caption"
        else:
            assert s.meta["caption"] == orig and not any(op["op"] == "caption" for op in s.meta.get("ops", []))


def test_only_missing_false_recaptions_everything(blip2_dir, monkeypatch):
    stage = Blip2Captioner({"model": str(blip2_dir), "max_new_tokens": 5, "only_missing": False}, "cpu")
    seen = count_images(stage, monkeypatch)
    samples = heldout_layouts(2, start=20)
    stage.process(samples)
    assert seen == [2]
    assert all(s.meta["ops"][-1]["op"] == "caption" for s in samples)


def test_missing_model_path_fails_at_validation(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        CaptionerParams(model=str(tmp_path / "no-such-blip2"))
    with pytest.raises(ValidationError, match="does not exist"):
        Blip2Captioner({"model": "./models/no-such-blip2"}, "cpu")
