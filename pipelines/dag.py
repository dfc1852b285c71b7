"""Pipeline: a DAG of named steps, built with `>>` in Python or loaded from a YAML recipe.

    load >> stats >> [length_filter, regex_filter]      # fan-out: both read stats' output
    [branch_a, branch_b] >> Concat()                     # fan-in: Concat reads both

A step object is one node: using the same object twice in an expression refers to the same node. Node names
default to the step's snake_case class name (numbered when repeated) and name the step's folder in the run
directory; `Pipeline.add(step, name=..., after=[...])` sets them explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thresher.errors import PipelineError
from thresher.pipelines.step import Step

if TYPE_CHECKING:
    from thresher.pipelines.runner import RunResult


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class Node:
    name: str
    step: Step
    parents: list[str] = field(default_factory=list)


class Pipeline:
    """A DAG of steps. Nodes keep insertion order, which is always a valid topological order."""

    def __init__(self, name: str = "pipeline") -> None:
        self.name = name
        self.nodes: dict[str, Node] = {}
        self.tips: list[str] = []  # the nodes `>>` attaches to next
        #: how `run()` executes by default: "local" or "ray" (a recipe's `runner:`), with the Ray runner's options
        #: (a recipe's `ray:` mapping: address, actors, num_cpus, num_gpus, steps)
        self.runner = "local"
        self.ray_options: dict[str, Any] = {}

    # ---- building -------------------------------------------------------------------------------

    @classmethod
    def from_step(cls, step: Step) -> Pipeline:
        p = cls()
        p.add(step)
        return p

    @classmethod
    def coerce(cls, obj: Any) -> Pipeline:
        if isinstance(obj, Pipeline):
            return obj
        if isinstance(obj, Step):
            return cls.from_step(obj)
        raise PipelineError(f"cannot use a {type(obj).__name__} in a pipeline; expected a Step or a Pipeline")

    @classmethod
    def merge(cls, parts: Sequence[Pipeline]) -> Pipeline:
        """Union of several pipelines; nodes holding the same step object are one node."""
        out = cls()
        tips: list[str] = []
        for part in parts:
            rename: dict[str, str] = {}
            for node in part.nodes.values():
                existing = out._name_of(node.step)
                if existing is not None:
                    rename[node.name] = existing
                    continue
                name = node.name if node.name not in out.nodes else out._unique(node.name)
                rename[node.name] = name
                out.nodes[name] = Node(name, node.step, [rename[p] for p in node.parents])
            for t in part.tips:
                if rename[t] not in tips:
                    tips.append(rename[t])
        out.tips = tips
        return out

    def _name_of(self, step: Step) -> str | None:
        for node in self.nodes.values():
            if node.step is step:
                return node.name
        return None

    def _unique(self, base: str) -> str:
        if base not in self.nodes:
            return base
        i = 2
        while f"{base}_{i}" in self.nodes:
            i += 1
        return f"{base}_{i}"

    def add(self, step: Step, *, name: str | None = None, after: Sequence[str] | None = None) -> str:
        """Add a step; `after` names its parents (default: none). Returns the node's name."""
        if not isinstance(step, Step):
            raise PipelineError(f"expected a Step, got {type(step).__name__}")
        existing = self._name_of(step)
        if existing is not None:
            raise PipelineError(f"step {existing!r} is already in the pipeline; add a clone() to use it twice")
        if name is not None and name in self.nodes:
            raise PipelineError(f"a step named {name!r} already exists")
        name = name or self._unique(step.default_name)
        if not _NAME.fullmatch(name):
            raise PipelineError(
                f"step name {name!r} is not usable: it names a folder in the run directory, so use letters, digits, "
                "'_', '-' and '.' (not first)"
            )
        parents = list(after or [])
        if len(set(parents)) != len(parents):
            raise PipelineError(f"step {name!r} names the same parent twice: {parents}")
        for p in parents:
            if p not in self.nodes:
                raise PipelineError(f"step {name!r} comes after {p!r}, which is not in the pipeline: {list(self.nodes)}")
        self.nodes[name] = Node(name, step, parents)
        self.tips = [name]
        return name

    def __rshift__(self, other: Any) -> Pipeline:
        targets = list(other) if isinstance(other, (list, tuple)) else [other]
        out = Pipeline.merge([self])
        out.name, out.runner, out.ray_options = self.name, self.runner, dict(self.ray_options)
        parents = list(out.tips)
        new_tips: list[str] = []
        for t in targets:
            if isinstance(t, Pipeline):
                # attach every root of the sub-pipeline after our tips
                merged = Pipeline.merge([out, t])
                for root in (n for n in t.nodes.values() if not n.parents):
                    node = merged.nodes[merged._name_of(root.step) or root.name]
                    if node.name in parents:
                        continue  # `a >> b` with b starting at a's last step: already joined there, not a cycle
                    node.parents = [*parents, *(p for p in node.parents if p not in parents)]
                merged._reorder()
                out = merged
                new_tips += [out._name_of(t.nodes[x].step) or x for x in t.tips]
            elif isinstance(t, Step):
                existing = out._name_of(t)
                if existing is not None:
                    node = out.nodes[existing]
                    node.parents += [p for p in parents if p not in node.parents]
                    out._reorder()
                    new_tips.append(existing)
                else:
                    new_tips.append(out.add(t, after=parents))
            else:
                raise PipelineError(f"cannot chain {type(t).__name__}; expected a Step, a Pipeline or a list of them")
        out.tips = new_tips
        return out

    def __rrshift__(self, other: Any) -> Pipeline:
        if isinstance(other, (list, tuple)):
            return Pipeline.merge([Pipeline.coerce(o) for o in other]) >> self
        return Pipeline.coerce(other) >> self

    def _reorder(self) -> None:
        """Restore a topological insertion order after parents were added to an existing node."""
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(n: str, trail: list[str]) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise PipelineError(f"the pipeline has a cycle: {' -> '.join([*trail, n])}")
            state[n] = 1
            for p in self.nodes[n].parents:
                visit(p, [*trail, n])
            state[n] = 2
            order.append(n)

        for n in list(self.nodes):
            visit(n, [])
        self.nodes = {n: self.nodes[n] for n in order}

    # ---- inspection -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, name: str) -> Step:
        return self.nodes[name].step

    def children(self, name: str) -> list[str]:
        return [n.name for n in self.nodes.values() if name in n.parents]

    def leaves(self) -> list[str]:
        return [n for n in self.nodes if not self.children(n)]

    def __repr__(self) -> str:
        lines = [f"Pipeline({self.name!r})"]
        for node in self.nodes.values():
            after = f" <- {', '.join(node.parents)}" if node.parents else ""
            lines.append(f"  {node.name}: {node.step!r}{after}")
        return "\n".join(lines)

    # ---- YAML ---------------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> Pipeline:
        """Load a recipe file (or YAML text holding `steps:`)."""
        from thresher.pipelines.recipe import load_recipe, recipe_from_text

        if isinstance(path_or_text, str) and "\n" in path_or_text:
            return recipe_from_text(path_or_text)
        return load_recipe(path_or_text)

    def to_yaml(self) -> str:
        from thresher.pipelines.recipe import dump_recipe

        return dump_recipe(self)

    # ---- checking and running -------------------------------------------------------------------

    def check(self) -> dict[str, list[str]]:
        """Check parameters, arity, columns along the DAG and fingerprints; return each node's columns."""
        from thresher.pipelines.runner import check_pipeline

        return check_pipeline(self)

    def estimate(
        self,
        run_dir: str | Path | None = None,
        *,
        sample: int = 8,
        tokenizer: Any = "auto",
        fill: float = 0.5,
    ) -> Any:
        """Expected requests, tokens and cost per step before paying for anything (`thresher.pipelines.estimate`);
        steps already finished in `run_dir` cost nothing. `print()` the result for the table."""
        from thresher.pipelines.estimate import estimate

        return estimate(self, run_dir=run_dir, sample=sample, tokenizer=tokenizer, fill=fill)

    def run(
        self,
        run_dir: str | Path,
        *,
        fresh: bool = False,
        progress: bool = True,
        runner: str | None = None,
        address: str | None = None,
    ) -> RunResult:
        """Run every step not already finished in `run_dir`; see `thresher.pipelines.runner`.

        runner: "local" (this process) or "ray" (row steps on a Ray cluster: `thresher.pipelines.ray_runner`);
        default: the pipeline's own (a recipe's `runner:`), else local. address: the Ray cluster to join (default:
        $RAY_ADDRESS, else a local cluster sized to this machine)."""
        from thresher.pipelines.runner import RUNNERS, Runner

        kind = runner or self.runner or "local"
        if kind not in RUNNERS:
            raise PipelineError(f"unknown runner {kind!r}; valid: {list(RUNNERS)}")
        if kind == "ray":
            from thresher.pipelines.ray_runner import RayRunner

            options = dict(self.ray_options)
            if address is not None:
                options["address"] = address
            return RayRunner(self, run_dir, fresh=fresh, progress=progress, **options).run()
        if address is not None:
            raise PipelineError("address names a Ray cluster: give it with runner='ray'")
        return Runner(self, run_dir, fresh=fresh, progress=progress).run()
