"""The recipe: a YAML file validated by pydantic, with errors that point at lines.

A recipe says where the source samples come from, which stages run on them
with which parameters and resources, how many variants each source gets, and
where the shards go. ``load_recipe`` returns a fully resolved
:class:`Recipe` (every default filled in) or raises :class:`RecipeError`
whose message names each bad field's YAML path and line and how to fix it.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import RecipeError
from .stage import Resources, get_stage

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.count("/") >= 2 or "\\" in value


def check_model_ref(value: str) -> str:
    """A model is a local folder or a hub id; a path that is not there is an error now,
    before any actor starts, not a crash on a GPU worker later."""
    if "://" in value:
        return value
    local = Path(os.path.expanduser(value))
    if local.exists():
        return value
    if _looks_like_path(value) or not HUB_ID.match(value):
        raise ValueError(
            f"model path {value!r} does not exist; give a folder written by save_pretrained "
            f"(e.g. models/...) or a hub id such as 'org/name'"
        )
    return value


ModelRef = Annotated[str, AfterValidator(check_model_ref)]


def check_choice(value, choices, what: str):
    """``value`` if it is one of ``choices``, else a ValueError naming them (and the closest)."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {what} {value!r}{hint}; choose one of {', '.join(choices)}")
    return value


def _check_source_path(value: str) -> str:
    if "://" in value:  # object stores are checked when the plan lists them
        return value
    p = Path(os.path.expanduser(value))
    if not p.exists():
        raise ValueError(f"source path {value!r} does not exist; check the path (relative paths start at the directory you run from)")
    if p.is_dir() and not any(p.iterdir()):
        raise ValueError(f"source path {value!r} is an empty directory; point it at the folder that holds the data")
    return value


SourcePath = Annotated[str, AfterValidator(_check_source_path)]


CACHE_PARAMS = ("cache",)  # stage params that say where, not what


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorldSource(_Strict):
    """Scenes of the embedded reference world, rendered on the fly."""

    kind: Literal["world"]
    split: Literal["train", "test"] = "train"
    n: PositiveInt = 100
    start: int = Field(0, ge=0, description="index of the first scene")
    world_seed: int = 0


class ShardsSource(_Strict):
    """WebDataset shards in this project's sample format: a folder with index.json, or a tar."""

    kind: Literal["shards"]
    path: SourcePath
    limit: PositiveInt | None = None


class FSC147Source(_Strict):
    """An FSC147 folder (as FSC147_384_V2): images_384_VarV2/, annotation_FSC147_384.json with
    points and exemplar boxes, Train_Test_Val_FSC_147.json, density maps (see factory.sources)."""

    kind: Literal["fsc147"]
    path: SourcePath
    split: str = "train"
    limit: PositiveInt | None = None

    @field_validator("path")
    @classmethod
    def _fsc147_folder(cls, v):
        if "://" in v:  # object stores are checked when the plan lists them
            return v
        from .errors import FactoryError
        from .sources import check_fsc147_folder

        try:
            check_fsc147_folder(os.path.expanduser(v))
        except FactoryError as e:
            raise ValueError(str(e)) from None
        return v


class LatentsSource(_Strict):
    """Codes drawn from a generator's prior, one per seed (start .. start+n-1).

    A latents source has no image: a `sample_latent` stage (or another stage
    that makes images from codes) must come first.
    """

    kind: Literal["latents"]
    n: PositiveInt = 100
    start: int = Field(0, ge=0, description="first latent seed")


Source = Annotated[Union[WorldSource, ShardsSource, FSC147Source, LatentsSource], Field(discriminator="kind")]


class StageSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    resources: Resources | None = None
    workers: PositiveInt | None = Field(None, description="most actors of this stage at once")
    batch_size: PositiveInt | None = None


class Output(_Strict):
    path: str | None = Field(None, description="folder or fsspec URI; `factory run --out` overrides it")
    shard_size: PositiveInt = 1000
    image_format: Literal["png", "jpg"] = "png"


class Recipe(_Strict):
    version: Literal[1]
    name: str = "recipe"
    seed: int = 0
    variants: PositiveInt = Field(1, description="M: output samples per source sample")
    op: str | None = Field(None, description="the op tag in keys; defaults to the first stage name")
    sources: list[Source] = Field(min_length=1)
    stages: list[StageSpec] = Field(default_factory=list)
    output: Output = Field(default_factory=Output)

    @model_validator(mode="after")
    def _op_tag(self):
        if self.op is None:
            self.op = self.stages[0].name if self.stages else "copy"
        if not re.fullmatch(r"[A-Za-z0-9_]{1,40}", self.op):
            raise ValueError("op must be 1-40 letters, digits or underscores (it goes into every key)")
        return self

    def resolved(self) -> dict:
        return self.model_dump(mode="json")

    def content_hash(self) -> str:
        """Hash of what decides the output bytes: not the output path, worker counts,
        resources or batch sizes, which change where and how fast, not what."""
        d = self.resolved()
        d["output"].pop("path", None)
        for s in d["stages"]:
            for k in ("resources", "workers", "batch_size"):
                s.pop(k, None)
            # Where fitted artefacts are cached is not what they are (their key holds every input).
            for k in CACHE_PARAMS:
                s.get("params", {}).pop(k, None)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


# --- loading with line numbers ---------------------------------------------

def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict:
    """Map every YAML path (keys and list indices) to its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[path + (k.value,)] = k.start_mark.line + 1
            _line_index(v, path + (k.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_index(v, path + (i,), out)
    return out


def _yaml_path(loc: tuple, lines: dict) -> tuple:
    """Drop pydantic's union tags (e.g. 'world' in sources.0.world.n) that YAML lacks."""
    path: tuple = ()
    for part in loc:
        if path + (part,) in lines or isinstance(part, int):
            path += (part,)
        elif part in ("world", "shards", "fsc147", "latents", "function-after[_check_source_path(), str]"):
            continue
        else:
            path += (part,)
    return path


def _dotted(path: tuple) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "(top level)"


def _line_of(path: tuple, lines: dict) -> int | None:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path)


def _model_at(model: type, loc: tuple) -> type | None:
    """The pydantic model that owns the last element of ``loc`` (for name suggestions)."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            field = cur.model_fields.get(part)
            if field is None:
                return None
            cur = field.annotation
        elif isinstance(part, int):
            cur = typing.get_args(cur)[0] if typing.get_args(cur) else None
        else:
            cur = None
        cur = _unwrap(cur, part)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _unwrap(tp: Any, part: Any) -> Any:
    while typing.get_origin(tp) in (Annotated, Union, typing.Union) or str(typing.get_origin(tp)) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is Annotated:
            tp = args[0]
            continue
        if len(args) == 1:
            tp = args[0]
            continue
        return tp  # a real union: resolved by the next loc part (the tag) in _model_at
    return tp


def _explain(err: dict, model: type | None) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field {name!r}: {hint}allowed fields are {', '.join(allowed)}"
    if kind == "missing":
        return f"required field {loc[-1]!r} is missing: add it"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and kind not in ("model_type", "dict_type", "list_type"):
        msg += f" (got {err['input']!r})"
    return msg


def _raise(errors: list[tuple[tuple, str]], lines: dict, where: str) -> typing.NoReturn:
    parts = []
    for path, text in errors:
        line = _line_of(path, lines)
        at = f" (line {line})" if line else ""
        parts.append(f"{_dotted(path)}{at}: {text}")
    n = len(parts)
    head = f"{where}: {n} problem{'s' if n > 1 else ''} in the recipe. "
    raise RecipeError(head + "; ".join(parts) + ". Fix the recipe and run `factory validate` again.")


def _union_member(source: dict) -> type | None:
    return {"world": WorldSource, "shards": ShardsSource, "fsc147": FSC147Source,
            "latents": LatentsSource}.get(source.get("kind")) if isinstance(source, dict) else None


def parse_recipe(data: Any, lines: dict | None = None, where: str = "recipe") -> Recipe:
    lines = lines or {}
    if not isinstance(data, dict):
        _raise([((), "a recipe is a YAML mapping with version, sources, stages and output")], lines, where)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            path = _yaml_path(err["loc"], lines)
            model = _model_at(Recipe, path)
            if model is None and len(path) >= 3 and path[0] == "sources":
                model = _union_member(data["sources"][path[1]])
            errors.append((path, _explain(err, model)))
        _raise(errors, lines, where)
    errors = []
    for i, spec in enumerate(recipe.stages):
        try:
            cls = get_stage(spec.name)
        except Exception as e:  # unknown stage: the message suggests the closest name
            errors.append((("stages", i, "name"), str(e).rstrip(".")))
            continue
        try:
            spec.params = cls.Params(**spec.params).model_dump(mode="json")
        except ValidationError as e:
            for err in e.errors():
                path = ("stages", i, "params") + tuple(err["loc"])
                errors.append((path, _explain(err, cls.Params)))
    if errors:
        _raise(errors, lines, where)
    return recipe


def load_recipe(path: str | os.PathLike) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {str(p)!r} not found; give the path to a YAML recipe (see recipes/)")
    text = p.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(
            f"{p}: the YAML is malformed{at}: {problem}. Check the indentation there and that "
            f"each entry is `key: value` or a `- item` in a list."
        ) from None
    lines = _line_index(node) if node is not None else {}
    return parse_recipe(data, lines, str(p))
