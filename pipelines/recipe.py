"""YAML recipes: a pipeline written as data, validated with pydantic, with errors that point at the YAML key.

    name: quickstart
    steps:
      load:
        step: Load                      # a registered step name, or `package.module:Class`
        params: {path: data.jsonl}      # relative paths are relative to this file
      stats:
        step: TextStats                 # `after` defaults to the previous step
      long_enough:
        step: LengthFilter
        params: {min_chars: 20}
      short_enough:
        step: LengthFilter
        after: stats                    # fan-out: reads `stats`, like `long_enough`
        params: {max_chars: 4000}

Step parameters are checked against the step's constructor signature (types, unknown keys) before anything runs;
the message names the key path and the line, e.g. `recipe.yaml:12 steps.long_enough.params.min_chars: ...`.

A string parameter may name environment variables, `${NAME}` or `${NAME:-default}` (`$${` is a literal `${`), so one
recipe serves every endpoint: `backend: {kind: openai, model: "${THRESHER_MODEL:-gpt-4o-mini}"}`. An unset variable
without a default is an error naming the key. Keys belong in `api_key_env`, which names the variable, not its value.
"""

from __future__ import annotations

import inspect
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from thresher.errors import ConfigError, PipelineError
from thresher.pipelines.dag import Pipeline
from thresher.pipelines.params import REDACTED
from thresher.pipelines.registry import resolve
from thresher.pipelines.step import Step


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: str = Field(description="registered step name or module:Class")
    params: dict[str, Any] = Field(default_factory=dict)
    after: list[str] | str | None = Field(default=None, description="parent step(s); default: the previous step")


class RayStepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actors: int | None = Field(default=None, ge=1, description="actors in the step's pool")
    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)


class RayOptions(RayStepOptions):
    """`runner: ray` options: the cluster, the default actor pool, and per-step pools (`steps: {name: {...}}`)."""

    address: str | None = None
    steps: dict[str, RayStepOptions] = Field(default_factory=dict)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "pipeline"
    description: str | None = None
    runner: Literal["local", "ray"] = "local"
    ray: RayOptions | None = None
    steps: dict[str, StepSpec]


# ---- environment variables in parameters ----------------------------------------------------------

_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: Any, path: tuple[Any, ...]) -> Any:
    """`value` with `${NAME}` / `${NAME:-default}` in its strings replaced from the environment."""
    if isinstance(value, dict):
        return {k: _expand_env(v, where, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where, (*path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        got = os.environ.get(name)
        if got is None or (got == "" and default is not None):
            if default is None:
                raise ConfigError(f"{where(path)}: environment variable {name} is not set (write ${{{name}:-default}} to give one)")
            return default
        return got

    return _ENV_REF.sub(sub, value)


# ---- locating keys in the YAML text ---------------------------------------------------------------


def _yaml_lines(text: str, source: str = "<recipe>") -> dict[tuple[Any, ...], int]:
    """Map each key path (('steps', 'stats', 'params', 'min_chars'), ...) to its 1-based line.

    A key given twice in one mapping is a ConfigError: YAML loaders keep the last one silently, which would drop a
    whole step whose name was copied and not changed.
    """
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
                line = k.start_mark.line + 1
                if key in seen:
                    loc = ".".join(str(p) for p in (*path, key))
                    raise ConfigError(
                        f"{source}:{line} {loc}: duplicate key {key!r} (first at line {seen[key]}); "
                        "give each key once (rename a copied step)"
                    )
                seen[key] = line
                lines[(*path, key)] = line
                walk(v, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _where(source: str, lines: dict[tuple[Any, ...], int], path: tuple[Any, ...]) -> str:
    loc = ".".join(str(p) for p in path) or "(top level)"
    for n in range(len(path), -1, -1):  # the deepest key that exists in the file
        if path[:n] in lines:
            return f"{source}:{lines[path[:n]]} {loc}"
    return f"{source} {loc}"


# ---- parameter validation -------------------------------------------------------------------------


def _params_model(cls: type[Step]) -> type[BaseModel]:
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: validate names only
        hints = {}
    fields: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if name == "self" or p.kind != p.KEYWORD_ONLY:
            continue
        ann = hints.get(name, Any)
        default = p.default
        if default is inspect.Parameter.empty:
            fields[name] = (ann, ...)
        else:
            if hasattr(default, "role") and hasattr(default, "value"):  # runtime()/secret() marker
                default = default.value
            fields[name] = (ann, default)
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        f"{cls.__name__}Params",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )
    return model


def _is_path_param(cls: type[Step], name: str) -> bool:
    try:
        ann = typing.get_type_hints(cls.__init__).get(name)
    except Exception:
        return False
    return ann is not None and "Path" in repr(ann)


def build_step(cls: type[Step], params: dict[str, Any], *, base_dir: Path | None, where: Any) -> Step:
    """Validate `params` against the constructor of `cls` and construct the step."""
    model = _params_model(cls)
    try:
        validated = model.model_validate(params)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = tuple(err["loc"])
            msgs.append(f"{where(('params', *loc))}: {err['msg']} (got {err.get('input')!r})")
        valid = ", ".join(sorted(model.model_fields))
        raise ConfigError("\n".join(msgs) + f"\n  valid parameters of {cls.__name__}: {valid}") from None
    given = {k: getattr(validated, k) for k in params}
    if base_dir is not None:
        for k, v in given.items():
            if isinstance(v, (str, Path)) and _is_path_param(cls, k) and not Path(v).is_absolute():
                given[k] = str((base_dir / v).resolve()) if isinstance(v, str) else (base_dir / v).resolve()
    try:
        return cls(**given)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where(('params',))}: {e}") from e


# ---- loading and dumping --------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike[str]) -> Pipeline:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e}") from e
    return recipe_from_text(text, source=str(path), base_dir=path.resolve().parent)


def recipe_from_text(text: str, *, source: str = "<recipe>", base_dir: Path | None = None) -> Pipeline:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    lines = _yaml_lines(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a mapping with `steps:`; got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        msgs = [f"{_where(source, lines, tuple(err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(msgs)) from None
    pipeline = Pipeline(recipe.name)
    pipeline.runner = recipe.runner
    if recipe.ray is not None:
        pipeline.ray_options = recipe.ray.model_dump(exclude_none=True, exclude_defaults=True)
    previous: str | None = None
    for name, spec in recipe.steps.items():

        def where(sub: tuple[Any, ...], _name: str = name) -> str:
            return _where(source, lines, ("steps", _name, *sub))

        try:
            cls = resolve(spec.step)
        except ConfigError as e:
            raise ConfigError(f"{where(('step',))}: {e}") from None
        params = {k: _expand_env(v, where, ("params", k)) for k, v in spec.params.items()}
        step = build_step(cls, params, base_dir=base_dir, where=where)
        if spec.after is None:
            after = [previous] if previous is not None and step.n_inputs != 0 else []
        else:
            after = [spec.after] if isinstance(spec.after, str) else list(spec.after)
        try:
            pipeline.add(step, name=name, after=after)
        except PipelineError as e:
            raise PipelineError(f"{where(('after',))}: {e}") from None
        previous = name
    return pipeline


def to_recipe(pipeline: Pipeline) -> dict[str, Any]:
    """The recipe dict of a pipeline (secrets omitted), so `recipe_from_text(yaml.dump(...))` rebuilds it."""
    steps: dict[str, Any] = {}
    previous: str | None = None
    for node in pipeline.nodes.values():
        params = {
            k: _plain(v)
            for k, v in node.step.public_params().items()
            if v != REDACTED and k not in node.step._secret_params
        }
        spec: dict[str, Any] = {"step": _step_ref(type(node.step))}
        if params:
            spec["params"] = params
        default_after = [previous] if previous is not None and node.step.n_inputs != 0 else []
        if node.parents != default_after:
            spec["after"] = list(node.parents)
        steps[node.name] = spec
        previous = node.name
    out: dict[str, Any] = {"name": pipeline.name}
    if pipeline.runner != "local":
        out["runner"] = pipeline.runner
    if pipeline.ray_options:
        out["ray"] = _plain(pipeline.ray_options)
    out["steps"] = steps
    return out


def _step_ref(cls: type[Step]) -> str:
    from thresher.pipelines.registry import _REGISTRY

    return cls.__name__ if _REGISTRY.get(cls.__name__) is cls else f"{cls.__module__}:{cls.__qualname__}"


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


def dump_recipe(pipeline: Pipeline) -> str:
    return yaml.safe_dump(to_recipe(pipeline), sort_keys=False, allow_unicode=True)
