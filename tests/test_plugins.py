"""The core finds stages the way it finds plugins: entry points, imported on first use."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_module_of_the_core_imports_the_stages():
    offenders = []
    for path in (ROOT / "factory").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n and n.split(".")[0] == "actors"]
    assert offenders == []


def _python(code: str, site: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{ROOT}" if site else str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_stage_module_is_imported_only_when_a_recipe_names_it():
    out = _python("""
        import sys
        from factory.recipe import parse_recipe
        parse_recipe({"version": 1, "sources": [{"kind": "world", "n": 2}], "stages": [{"name": "render"}]})
        print(sorted(m for m in sys.modules if m.startswith("actors")))
        print("diffusers" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "['actors', 'actors.renderers']"
    assert out.stdout.split("\n")[1] == "False"


def test_a_third_party_stage_is_found_like_a_built_in(tmp_path):
    site = tmp_path / "site"
    info = site / "shout_stage-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "shout_stage.py").write_text(textwrap.dedent("""
        from factory.stage import Stage

        class Shout(Stage):
            name = "shout"

            def process_one(self, sample, rng):
                sample.meta["caption"] = sample.meta.get("caption", "").upper()
    """))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-stage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[factory.stages]\nshout = shout_stage:Shout\n")
    out = _python("""
        from factory.stage import get_stage, stage_names
        from factory.sample import Sample
        assert "shout" in stage_names() and "generate" in stage_names()
        s = Sample("k", 0, meta={"caption": "red digits"})
        get_stage("shout")().process([s])
        print(s.meta["caption"])
        try:
            get_stage("shuot")
        except Exception as e:
            print(e)
    """, site)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().split("\n")
    assert lines[0] == "RED DIGITS"
    assert "unknown stage 'shuot'. Did you mean 'shout'?" in lines[1]
