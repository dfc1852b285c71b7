"""Training recipes at tiny size on the CPU: explanation tuning (Respond draws one of the shipped `explain` system
instructions per row, seeded and recorded; the student trains on it) and weak-to-strong (a weak adapter labels, a
strong student trains on the labels, a ceiling on gold; PGR from held-out losses). The teacher is the scripted HTTP
server (it echoes the conversation, so what the teacher saw can be checked); the student is the bundled SmolLM2."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from thresher.errors import ConfigError
from thresher.evaluation.recipes import load_train_recipe, pgr, run_train_recipe
from thresher.generators.responder import Respond, load_system_prompts, pick_system
from thresher.llms.testing import FaultServer, Rule

pytestmark = pytest.mark.usefixtures("isolated_cache")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO.parent / "shared" / "data" / "llama-factory-demo" / "alpaca_en_demo.json"


def test_shipped_explain_sets_have_ten_or_more_kinds_in_both_languages() -> None:
    en, zh = load_system_prompts("explain", "en"), load_system_prompts("explain", "zh")
    assert len(en) >= 10 and list(en) == list(zh)  # the same kinds, keyed alike
    assert all("step" in t.lower() or "reason" in t.lower() or "why" in t.lower() or "explain" in t.lower()
               for t in en.values())  # fmt: skip
    assert len(set(en.values())) == len(en)


def test_respond_draws_a_system_instruction_per_row_seeded_and_recorded(fault: FaultServer) -> None:
    rows = [{"id": f"r{i}", "instruction": f"Task {i}", "input": "", "output": None, "system": None} for i in range(40)]
    rows[3]["system"] = "Answer in French."  # a row's own system message stands
    fault.configure(script=[Rule(match=r"(?s)^(.*)$", role="system", reply=r"[under: \1] an answer").to_dict()])
    step = Respond(backend={"kind": "openai", "base_url": fault.base_url, "model": "teacher"},
                   system_prompts="explain", seed=7, max_tokens=64)  # fmt: skip
    step.check()
    out = step.map_batch(pa.Table.from_pylist(rows))
    table = load_system_prompts("explain")
    kinds, systems = out["system_kind"].to_pylist(), out["system"].to_pylist()
    assert kinds[3] is None and systems[3] == "Answer in French."
    for i, (k, s) in enumerate(zip(kinds, systems, strict=True)):
        if i != 3:
            assert table[k] == s and k == pick_system(list(table), 7, f"r{i}")
    assert len({k for k in kinds if k}) >= 8  # 39 rows spread over the 12 kinds
    # the teacher was asked with that system message (the scripted server answers with the system text it got)
    answers = out["output"].to_pylist()
    assert answers[0] == f"[under: {table[kinds[0]]}] an answer"
    assert answers[3] == "[under: Answer in French.] an answer"
    # the same seed gives the same draw in any batch order; another seed another draw
    again = step.map_batch(pa.Table.from_pylist(rows[::-1]))["system_kind"].to_pylist()[::-1]
    assert again == kinds
    other = Respond(backend={"kind": "openai", "base_url": fault.base_url, "model": "teacher"},
                    system_prompts="explain", seed=8).map_batch(pa.Table.from_pylist(rows))  # fmt: skip
    assert other["system_kind"].to_pylist() != kinds
    # the set's text is part of the fingerprint; absent, Respond's fingerprint is what it was
    assert step.fingerprint() != Respond(backend=step.backend, system_prompts=["Explain."], seed=7, max_tokens=64).fingerprint()
    assert "system_prompts" not in Respond().semantic_params()


def test_respond_system_prompts_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        Respond(system_prompt="x", system_prompts="explain").check()
    bad = tmp_path / "mine.txt"
    bad.write_text("# mine\nok | Explain.\nno bar here\n")
    with pytest.raises(ConfigError, match=r"mine.txt, line 3: expected 'key \| system instruction'"):
        load_system_prompts(str(bad))
    with pytest.raises(ConfigError, match="neither a file nor a shipped set"):
        load_system_prompts("explian")


def _recipe(tmp_path: Path, fault: FaultServer, smol: Path, kind: str, **extra: Any) -> Path:
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps(json.loads(DEMO.read_text())[200:203]))
    steps: dict[str, Any] = {"load": {"step": "Load", "params": {"path": str(DEMO), "limit": 4}}}
    if kind == "sft":
        steps["respond"] = {"step": "Respond", "params": {
            "backend": {"kind": "openai", "base_url": fault.base_url, "model": "teacher"},
            "system_prompts": "explain", "seed": 0, "max_tokens": 48, "temperature": 0.0}}  # fmt: skip
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"name": "data", "steps": steps}))
    recipe = {"name": f"tiny-{kind}", "kind": kind, "data": "data.yaml",
              "train": {"model": str(smol), "max_seq_len": 64, "micro_batch_tokens": 256, "lora_r": 4, "lora_alpha": 8,
                        "lora_dropout": 0.0, "learning_rate": 2e-3, "warmup_ratio": 0.0, "max_steps": 2, "device": "cpu"},
              "eval": {"heldout": "heldout.json"}, **extra}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_explanation_tuning_recipe_builds_explained_rows_and_trains(fault: FaultServer, smol_hf_dir: Path,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    path = _recipe(tmp_path, fault, smol_hf_dir, "sft")
    res = run_train_recipe(path, tmp_path / "run")
    rows = json.loads((tmp_path / "run" / "train.json").read_text())
    table = load_system_prompts("explain")
    assert len(rows) == 4 and all(table[r["system_kind"]] == r["system"] for r in rows)
    assert res["train"]["steps"] == 2 and math.isfinite(res["train"]["train_loss"])
    base, trained = res["heldout_loss"]["base"], res["heldout_loss"]["trained"]
    assert math.isfinite(base) and math.isfinite(trained) and base != trained
    # the student's rendered training text carries the recorded system message
    from thresher.trainer.chat import row_to_messages

    assert row_to_messages(rows[0])[0] == {"role": "system", "content": rows[0]["system"]}
    page = (tmp_path / "run" / "report.html").read_text()  # the run report shows the training and the evaluation
    assert "Evaluation" in page and f"{trained:.4f}" in page and "train/metrics.jsonl" in page
    # a second run pays for nothing: the pipeline is cached, the training done
    requests = fault.stats()["total"]
    again = run_train_recipe(path, tmp_path / "run")
    assert fault.stats()["total"] == requests and again["train"] == res["train"]
    # a finished training is reused only for the same experiment
    with pytest.raises(ConfigError, match=r"finished training with another config \(lora_r: 4 -> 8\)"):
        run_train_recipe(load_train_recipe(path, train={"lora_r": 8}), tmp_path / "run")


def test_weak_to_strong_recipe_reports_pgr(fault: FaultServer, smol_hf_dir: Path, tmp_path: Path) -> None:
    path = _recipe(tmp_path, fault, smol_hf_dir, "weak_to_strong",
                   weak_to_strong={"weak_train": {"lora_r": 1, "lora_alpha": 2, "max_steps": 1}, "label_max_tokens": 12})
    res = run_train_recipe(path, tmp_path / "run")
    run = tmp_path / "run"
    labels = json.loads((run / "weak_labels.json").read_text())
    gold = json.loads((run / "transfer_gold.json").read_text())
    assert (res["weak_rows"], res["transfer_rows"]) == (2, 2) and len(labels) == 2
    assert [r["instruction"] for r in labels] == [r["instruction"] for r in gold]
    assert all(r["label_source"] == "weak" for r in labels) and labels[0]["output"] != gold[0]["output"]
    loss = res["heldout_loss"]
    assert set(loss) == {"weak", "student", "ceiling", "base"} and all(math.isfinite(v) for v in loss.values())
    assert res["pgr"] == pgr(loss["weak"], loss["student"], loss["ceiling"])
    print(json.dumps(loss), res["pgr"])
    assert json.loads((run / "results.json").read_text())["pgr"] == res["pgr"]
    page = (run / "report.html").read_text()
    assert "Performance gap recovered" in page and f"{loss['ceiling']:.4f}" in page


def test_pgr_formula() -> None:
    assert pgr(3.0, 2.5, 2.0) == pytest.approx(0.5)
    assert pgr(3.0, 2.0, 2.0) == pytest.approx(1.0)
    assert pgr(2.0, 1.0, 2.5) is None  # the ceiling is no better than the weak model: no gap


def test_shipped_recipes_load() -> None:
    for name in ("explain_tuning", "weak_to_strong"):
        recipe = load_train_recipe(REPO / "recipes" / f"{name}.yaml")
        assert Path(recipe.data).is_file() and Path(str(recipe.eval.heldout)).is_file()
    with pytest.raises(ConfigError, match=r"trian: Extra inputs"):
        load_train_recipe(REPO / "recipes" / "explain_tuning.yaml", trian={})
