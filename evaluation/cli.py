"""`thresher eval`: two models answer test sets, a judge compares each pair in both orders (click command, loaded
lazily by the top-level CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from thresher.errors import ThresherError

_SPEC_HELP = (
    "YAML/JSON backend spec ({kind: openai, base_url: ..., model: ...}; {kind: transformers, model: ..., adapter: DIR}), "
    "'bundled' (the embedded llama.cpp model), or a trained adapter directory (output_dir/adapter of thresher train)."
)


def parse_spec(text: str) -> dict[str, Any] | None:
    """A backend spec from the command line: 'bundled', an adapter directory, or YAML/JSON mapping text."""
    import yaml

    if text in ("bundled", "default", "llama_cpp"):
        return None
    path = Path(text)
    if path.is_dir():
        if (path / "adapter" / "adapter_config.json").is_file():
            path = path / "adapter"
        cfg = path / "adapter_config.json"
        if not cfg.is_file():
            raise click.BadParameter(f"{path} is a directory without adapter_config.json (give output_dir/adapter)")
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        return {"kind": "transformers", "adapter": str(path), **({"model": base} if base else {})}
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise click.BadParameter(f"{text!r} is not a YAML mapping: {e}") from None
    if not isinstance(spec, dict):
        raise click.BadParameter(f"{text!r}: expected 'bundled', an adapter directory or a mapping like "
                                 "'{kind: openai, base_url: ..., model: ...}'")  # fmt: skip
    return spec


@click.command("eval", help=(
    "Compare model A with model B the way AlpaGasus and Cherry LLM do: both answer each prompt of the test sets, a "
    "judge rates both answers from 1 to 10 in both orders; A wins a prompt when it wins both orders or one and ties "
    "the other, a disagreement is a tie. Prints win/tie/loss and the winning score (wins - losses) / N + 1 per set "
    "and writes OUT/eval.json and OUT/pairs-<set>.jsonl (answers, scores, the judge's reasons).\n\n" + _SPEC_HELP
))  # fmt: skip
@click.option("--a", "model_a", required=True, help="Model A (the one being assessed).")
@click.option("--b", "model_b", required=True, help="Model B (the reference).")
@click.option("--judge", "judge", default="bundled", show_default=True, help="The judge model.")
@click.option("--set", "test_sets", multiple=True, required=True,
              help="A test set: vicuna, koala, wizardlm, sinstruct, lima (from --data-dir) or a file (repeatable).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the Cherry LLM test sets (e.g. ../shared/data/cherry-llm).")
@click.option("--max-prompts", type=click.IntRange(min=1), default=None, help="Only the first N prompts of each set.")
@click.option("--names", default="a,b", show_default=True, help="Names of A and B in the report, comma-separated.")
@click.option("--language", type=click.Choice(["en", "zh"]), default="en", show_default=True,
              help="Language of the judge's shipped template.")
@click.option("--prompt", "prompt_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Your own judge template (placeholders $instruction, $first, $second).")
@click.option("--answer-max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--judge-max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--structured", is_flag=True, default=False,
              help="Ask the judge for JSON (a reason, then both scores) through structured output, so every reply "
                   "carries two scores; --prompt is then the compare_json template.")
@click.option("--heldout", type=click.Path(exists=True), default=None,
              help="Reference rows with responses: also report each local transformers model's mean answer loss.")
@click.option("--heldout-max-rows", type=click.IntRange(min=1), default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/eval"), show_default=True)
def eval_command(
    model_a: str, model_b: str, judge: str, test_sets: tuple[str, ...], data_dir: Path | None,
    max_prompts: int | None, names: str, language: str, prompt_file: str | None, answer_max_tokens: int,
    judge_max_tokens: int, structured: bool, heldout: str | None, heldout_max_rows: int | None, out: Path,
) -> None:  # fmt: skip
    from thresher.evaluation.pairwise import pairwise_eval

    pair = [n.strip() for n in names.split(",")]
    if len(pair) != 2 or not all(pair):
        raise click.BadParameter(f"expected two names separated by a comma, got {names!r}", param_hint="--names")
    try:
        result = pairwise_eval(
            parse_spec(model_a), parse_spec(model_b), judge=parse_spec(judge), test_sets=list(test_sets),
            data_dir=data_dir, max_prompts=max_prompts, names=(pair[0], pair[1]), language=language,
            prompts={"compare_json" if structured else "compare": prompt_file} if prompt_file else None,
            answer_max_tokens=answer_max_tokens, judge_max_tokens=judge_max_tokens, structured=structured, heldout=heldout, heldout_max_rows=heldout_max_rows, out_dir=out,
        )  # fmt: skip
    except ThresherError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(result.table())
    click.echo(f"details: {out / 'eval.json'}")


@click.command("learn", help=(
    "Run a training recipe: build the set with its data pipeline, train on it, evaluate (held-out loss, and pairwise "
    "against the base when the recipe asks). Kinds: sft (explanation tuning is an sft recipe whose Respond draws "
    "explain system instructions; recipes/explain_tuning.yaml) and weak_to_strong (recipes/weak_to_strong.yaml: "
    "reports PGR). Re-running the same command resumes; results go to OUT/results.json."
))  # fmt: skip
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The run directory.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Override train.max_steps.")
def learn_command(recipe: Path, out: Path, max_steps: int | None) -> None:
    from thresher.evaluation.recipes import load_train_recipe, run_train_recipe

    try:
        loaded = load_train_recipe(recipe, **({"train": {"max_steps": max_steps}} if max_steps else {}))
        results = run_train_recipe(loaded, out, progress=True)
    except ThresherError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(results, indent=1))


@click.command("iterate", help=(
    "Run the iterative data <-> training loop of a training recipe with an `iterate:` section: each round the "
    "current model (the base, then the last round's adapter) answers in the data recipe's model steps, the curation "
    "steps select, the trainer trains a new adapter, and it is compared with the model before; the loop stops early "
    "when a round does not improve. Rounds live in OUT/round-<r>/; re-running the command resumes at the round and "
    "step where it stopped. Summary: OUT/iterate.json."
))  # fmt: skip
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rounds", type=click.IntRange(min=1), required=True, help="Rounds at most.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The run directory.")
def iterate_command(recipe: Path, rounds: int, out: Path) -> None:
    from thresher.evaluation.iterate import iterate

    try:
        state = iterate(recipe, out, rounds=rounds, progress=True)
    except ThresherError as exc:
        raise click.ClickException(str(exc)) from None
    for rec in state["rounds"]:
        click.echo(f"round {rec['round']}: {rec['rows']} rows, {rec['comparison']}, "
                   f"{'improved' if rec['improved'] else 'no improvement'}")  # fmt: skip
    click.echo(f"best round: {state['best_round']}; stopped: {state['stopped']}")
