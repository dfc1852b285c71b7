"""Every step holds to one contract (constructs, clones, YAML round trip, stable fingerprints, accounting), and works
on its own outside a pipeline with the same validation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from thresher.errors import ConfigError, FingerprintError, PipelineError
from thresher.filters import ExactDedup, LengthFilter, RegexFilter
from thresher.pipelines import Pipeline, RowStep, runtime, secret
from thresher.pipelines.registry import _REGISTRY, available_steps

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

# Example parameters for every registered step: a new step without an entry here fails the conformance test, so
# nobody can add a step that escapes the contract. Value: (params, a semantic parameter to change, a new value).
EXAMPLES: dict[str, tuple[dict[str, Any], str, Any]] = {
    "TextStats": ({}, "", None),
    "SetValue": ({"column": "source", "value": "alpaca"}, "value", "dolly"),
    "LengthFilter": ({"min_chars": 5, "max_chars": 500}, "min_chars", 6),
    "RegexFilter": ({"pattern": "as an ai"}, "pattern", "sorry"),
    "ExactDedup": ({}, "fields", ["instruction"]),
    "RougeFilter": ({"threshold": 0.7, "reference": ["Write a poem."]}, "threshold", 0.5),
    "Load": ({"path": str(SHARED / "llama-factory-demo" / "alpaca_en_demo.json")}, "limit", 7),
    "Concat": ({}, "", None),
    "Respond": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, "max_tokens": 64},
                "temperature", 0.0),
    "SelfInstruct": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
                      "num_instructions": 10}, "num_instructions", 20),
    "EvolInstruct": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, "rounds": 2},
                     "rounds", 3),
    "LLMJudge": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
                  "dimensions": ["accuracy", "helpfulness"]}, "language", "zh"),
    "DeitaScorer": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, "max_group": 4},
                    "method", "rank"),
    "Tagger": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, "min_count": 2},
               "merge_similarity", 0.8),
    "IFDScorer": ({"backend": {"kind": "vllm", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, "max_length": 256},
                  "variant", "superfiltering"),
    "Perplexity": ({"backend": {"kind": "vllm", "base_url": "http://127.0.0.1:9/v1", "model": "m"}}, "max_length", 256),
    "RewardScorer": ({"model": "/models/reward-model"}, "format", "pair"),
    "Threshold": ({"column": "n", "minimum": 3}, "minimum", 4),
    "TopK": ({"column": "n", "k": 10}, "k", 5),
    "TopPercent": ({"column": "n", "percent": 25.0}, "percent", 50.0),
    "LongestSelect": ({"budget": 10}, "budget", 5),
    "RandomSelect": ({"budget": 10, "seed": 1}, "seed", 2),
    "MIGSelect": ({"budget": 10}, "tag_similarity", 0.8),
    "Decontaminate": ({"benchmarks": [str(SHARED / "cherry-llm" / "koala_test_set.jsonl")]}, "ngram", 10),
    "NearDedup": ({"threshold": 0.9, "score": "deita_score"}, "threshold", 0.85),
    "DiversitySelect": ({"score": "deita_score", "budget": 100}, "threshold", 0.8),
    "KMeansSample": ({"k": 4, "per_cluster": 2, "score": "perplexity"}, "quantiles", (0.1, 0.9)),
    "TaskClassifier": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}},
                       "language", "zh"),
    "ReAlign": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}, "task": "open_qa",
                 "retriever": {"kind": "bm25", "corpus": ["Canberra is the capital of Australia."]}}, "n", 3),
    "Polish": ({"backend": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}}, "min_length_ratio",
               0.6),
}
# steps whose accounting can be checked on the small table below without a model
CHEAP = {"TextStats", "SetValue", "LengthFilter", "RegexFilter", "ExactDedup"}
CHEAP |= {"Threshold", "TopK", "TopPercent", "LongestSelect", "RandomSelect", "Decontaminate"}


def small_table() -> pa.Table:
    return pa.table({
        "id": [f"r{i}" for i in range(40)],
        "instruction": [f"Say hello {i % 15} times." for i in range(40)],
        "input": ["" if i % 2 else "politely" for i in range(40)],
        "output": ["hello " * (i % 9) if i % 11 else "As an AI, I cannot." for i in range(40)],
        "n": [i % 7 for i in range(40)],
    })


def registered() -> list[str]:
    # test-only steps (defined under tests/) are exempt from the examples table
    return [n for n in available_steps() if not _REGISTRY[n].__module__.startswith(("pipeline_steps", "test_"))]


@pytest.mark.parametrize("name", registered())
def test_every_step_holds_to_the_contract(name: str) -> None:
    assert name in EXAMPLES, f"add example parameters for step {name} to EXAMPLES"
    params, knob, new_value = EXAMPLES[name]
    cls = _REGISTRY[name]
    step = cls(**params)
    # parameters are stored as given; clone gives an equal, independent step
    for k, v in params.items():
        assert step.get_params()[k] == v
    twin = step.clone()
    assert twin is not step and twin.get_params() == step.get_params()
    assert twin.fingerprint() == step.fingerprint()
    # YAML round trip rebuilds the same step
    rebuilt = Pipeline.from_yaml(Pipeline.from_step(step).to_yaml())
    (only,) = rebuilt.nodes.values()
    assert type(only.step) is cls and only.step.fingerprint() == step.fingerprint()
    # a semantic parameter changes the fingerprint; a runtime knob does not
    if knob:
        assert step.clone(**{knob: new_value}).fingerprint() != step.fingerprint()
    for rt in cls._runtime_params:
        current = step.get_params()[rt]
        other = (current or 1) * 2 if isinstance(current, int) else "x"
        assert step.clone(**{rt: other}).fingerprint() == step.fingerprint()
    assert cls.reads or cls.writes  # declares its columns
    if name in CHEAP:
        res = step.apply(small_table())
        assert res.rows_in == res.rows_out + res.rows_rejected + res.rows_failed
        if res.rows_rejected:
            assert set(res.rejected.column("rejected_by").to_pylist()) == {step.default_name}
            assert all(res.rejected.column("reason").to_pylist())


def test_step_on_its_own_keeps_the_container_type() -> None:
    import datasets
    import pandas as pd

    rows = small_table().to_pylist()
    f = LengthFilter(min_chars=10)
    out_list = f(rows)
    assert isinstance(out_list, list) and all(len(r["output"]) >= 10 for r in out_list)
    out_df = f(pd.DataFrame(rows))
    assert isinstance(out_df, pd.DataFrame) and len(out_df) == len(out_list)
    out_ds = f(datasets.Dataset.from_list(rows))
    assert isinstance(out_ds, datasets.Dataset) and out_ds.num_rows == len(out_list)
    res = RegexFilter(pattern="as an ai").apply(rows)
    assert res.rows_rejected == 4 and res.rejected.column("reason")[0].as_py() == "output matches /as an ai/"


def test_step_on_its_own_validates_like_in_a_pipeline() -> None:
    with pytest.raises(PipelineError, match=r"needs column\(s\) \['output'\].*available: \['id', 'instruction'\]"):
        LengthFilter()([{"id": "a", "instruction": "x"}])
    with pytest.raises(ConfigError, match="max_chars"):
        LengthFilter(min_chars=10, max_chars=5)(small_table())
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        RegexFilter(pattern="(unclosed")(small_table())


def test_exact_dedup_explains_itself() -> None:
    res = ExactDedup().apply(small_table())
    # 15 distinct instructions x 2 inputs ("" / "politely") -> 30 groups
    assert res.rows_out == 30 and res.rows_rejected == 10
    row = res.rejected.to_pylist()[0]
    assert row["duplicate_of"] in set(res.output.column("id").to_pylist())
    assert row["reason"] == "exact duplicate on instruction, input"
    assert "dedup_key" in res.output.column_names


def test_unhashable_parameter_fails_before_any_work(tmp_path: Path) -> None:
    from pipeline_steps import Numbers

    class WithObject(RowStep):
        inputs = ("id",)
        outputs = ("y",)

        def __init__(self, *, thing: Any = None):
            self.thing = thing

        def map_batch(self, batch: pa.Table) -> dict[str, Any]:
            raise AssertionError("must not run")

    with pytest.raises(FingerprintError, match=r"thing.*cannot be fingerprinted"):
        (Numbers(n=3) >> WithObject(thing=object())).check()


def test_secrets_stay_out_of_fingerprints_repr_yaml_and_manifest(tmp_path: Path) -> None:
    from pipeline_steps import Numbers

    class Keyed(RowStep):
        inputs = ("id",)
        outputs = ("y",)

        def __init__(self, *, model: str = "m", api_key: str | None = secret(None), batch_size: int = runtime(4)):
            self.model, self.api_key, self.batch_size = model, api_key, batch_size

        def map_batch(self, batch: pa.Table) -> dict[str, Any]:
            return {"y": [1] * batch.num_rows}

    key = "sk-test-THIS-MUST-NOT-LEAK-1234"
    a, b = Keyed(api_key=key), Keyed(api_key="another")
    assert a.fingerprint() == b.fingerprint()
    assert key not in repr(a)
    pipe = Numbers(n=5) >> a
    assert key not in pipe.to_yaml()
    pipe.run(tmp_path / "run", progress=False)
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f


def test_yaml_recipe_errors_point_at_the_key(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: bad\n"
        "steps:\n"
        "  stats:\n"
        "    step: TextStats\n"
        "  short:\n"
        "    step: LengthFilter\n"
        "    params:\n"
        "      max_chars: lots\n"
    )
    with pytest.raises(ConfigError) as e:
        Pipeline.from_yaml(recipe)
    assert f"{recipe}:8 steps.short.params.max_chars" in str(e.value)
    assert "valid parameters of LengthFilter" in str(e.value)

    recipe.write_text("steps:\n  a:\n    step: NoSuchStep\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3 steps.a.step: unknown step 'NoSuchStep'; known steps: .*TextStats"):
        Pipeline.from_yaml(recipe)

    recipe.write_text("steps:\n  a:\n    step: TextStats\n    afterr: x\n")
    with pytest.raises(ConfigError, match=r"r.yaml:4 steps.a.afterr: Extra inputs are not permitted"):
        Pipeline.from_yaml(recipe)

    recipe.write_text("steps:\n  a:\n    step: TextStats\n  b:\n    step: TextStats\n    after: [zzz]\n")
    with pytest.raises(PipelineError, match=r"r.yaml:6 steps.b.after: .*'zzz', which is not in the pipeline"):
        Pipeline.from_yaml(recipe)


def test_yaml_fan_out_and_round_trip() -> None:
    text = yaml.safe_dump({
        "name": "fan",
        "steps": {
            "stats": {"step": "TextStats"},
            "long": {"step": "LengthFilter", "params": {"min_chars": 20}},
            "clean": {"step": "RegexFilter", "after": "stats", "params": {"pattern": "sorry"}},
        },
    }, sort_keys=False)
    p = Pipeline.from_yaml(text)
    assert p.nodes["long"].parents == ["stats"] and p.nodes["clean"].parents == ["stats"]
    again = Pipeline.from_yaml(p.to_yaml())
    assert {n: (type(x.step), x.parents, x.step.fingerprint()) for n, x in again.nodes.items()} == {
        n: (type(x.step), x.parents, x.step.fingerprint()) for n, x in p.nodes.items()
    }


def test_step_on_a_list_of_dicts_keeps_keys_the_first_row_lacks() -> None:
    rows = [{"id": "a", "output": "long enough"}, {"id": "b", "output": "also long", "score": 5}]
    out = LengthFilter(min_chars=1)(rows)
    assert [r.get("score") for r in out] == [None, 5]


def test_yaml_duplicate_keys_are_errors_not_silently_dropped(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "steps:\n"
        "  stats: {step: TextStats}\n"
        "  filt: {step: LengthFilter, params: {min_chars: 5}}\n"
        "  filt: {step: RegexFilter, params: {pattern: sorry}}\n"
    )
    with pytest.raises(ConfigError, match=r"r.yaml:4 steps.filt: duplicate key 'filt' \(first at line 3\)"):
        Pipeline.from_yaml(recipe)
    recipe.write_text("steps:\n  f:\n    step: LengthFilter\n    params: {min_chars: 5, min_chars: 50}\n")
    with pytest.raises(ConfigError, match=r"r.yaml:4 steps.f.params.min_chars: duplicate key 'min_chars'"):
        Pipeline.from_yaml(recipe)


def test_path_parameters_fingerprint_the_same_as_str_and_after_a_yaml_round_trip(tmp_path: Path) -> None:
    from thresher.data import Load

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "x"}\n')
    step = Load(path=data, quarantine_path=tmp_path / "q.jsonl", on_bad_record="quarantine")
    assert step.fingerprint() == Load(path=str(data), quarantine_path=str(tmp_path / "q.jsonl"),
                                      on_bad_record="quarantine").fingerprint()
    (only,) = Pipeline.from_yaml(Pipeline.from_step(step).to_yaml()).nodes.values()
    assert only.step.fingerprint() == step.fingerprint()


def test_load_fingerprint_does_not_change_when_the_project_moves(tmp_path: Path) -> None:
    # recipes resolve relative paths to absolute ones: moving the project (or the run to another machine) must not
    # re-run every step, as long as the file's name and content are the same
    from thresher.data import Load

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "data.jsonl").write_text('{"instruction": "x"}\n')
    fp_a = Load(path=str(tmp_path / "a" / "data.jsonl")).fingerprint()
    assert Load(path=str(tmp_path / "b" / "data.jsonl")).fingerprint() == fp_a
    (tmp_path / "b" / "data.jsonl").write_text('{"instruction": "y"}\n')
    assert Load(path=str(tmp_path / "b" / "data.jsonl")).fingerprint() != fp_a


def test_chaining_two_pipelines_that_share_the_joint_step() -> None:
    from pipeline_steps import Numbers

    src, stats, short = Numbers(n=3), RegexFilter(pattern="x"), LengthFilter()
    head = src >> stats
    tail = stats >> short  # starts at head's last step
    joined = head >> tail
    assert list(joined.nodes) == ["numbers", "regex_filter", "length_filter"]
    assert joined.nodes["regex_filter"].parents == ["numbers"]
    assert joined.nodes["length_filter"].parents == ["regex_filter"]
    assert joined.tips == ["length_filter"]


def test_default_names_are_snake_case_with_acronyms_kept_whole() -> None:
    from thresher.filters import ExactDedup, KMeansSample, MIGSelect, TopK
    from thresher.scorers import IFDScorer, LLMJudge

    names = [s().default_name for s in (MIGSelect, LLMJudge, IFDScorer, TopK, ExactDedup, KMeansSample)]
    assert names == ["mig_select", "llm_judge", "ifd_scorer", "top_k", "exact_dedup", "k_means_sample"]
