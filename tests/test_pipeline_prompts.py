"""Prompt templates: shipped files per method and language, user overrides, holes refused, content in fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from thresher.errors import ConfigError
from thresher.pipelines import prompts
from thresher.pipelines.prompts import Prompt, check_overrides, load_prompt, prompts_digest


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for a package's prompts folder (the real ones ship with the methods)."""
    root = tmp_path / "pkg"
    (root / "prompts" / "demo").mkdir(parents=True)
    (root / "prompts" / "demo" / "ask.en.txt").write_text('Answer in JSON {"a": 1}: $question\n', encoding="utf-8")
    (root / "prompts" / "demo" / "ask.zh.txt").write_text("请回答：${question}\n", encoding="utf-8")

    def fake(package: str, method: str, name: str, language: str) -> Path:
        if language not in prompts.LANGUAGES:
            raise ConfigError(f"language {language!r} is not one of {list(prompts.LANGUAGES)}")
        return root / "prompts" / method / f"{name}.{language}.txt"

    monkeypatch.setattr(prompts, "shipped_prompt_path", fake)
    return root


def test_shipped_prompts_render_per_language_with_braces_left_alone(shipped: Path) -> None:
    en = load_prompt("generators", "demo", "ask", "en")
    assert en.render(question="why?") == 'Answer in JSON {"a": 1}: why?\n'
    assert load_prompt("generators", "demo", "ask", "zh").render(question="为什么？") == "请回答：为什么？\n"
    with pytest.raises(ConfigError, match="not one of"):
        load_prompt("generators", "demo", "ask", "fr")
    with pytest.raises(ConfigError, match="no shipped prompt 'nope'"):
        load_prompt("generators", "demo", "nope", "en")


def test_a_placeholder_left_empty_or_a_value_without_a_place_is_an_error(tmp_path: Path) -> None:
    p = Prompt("Rewrite $instruction as $style.", tmp_path / "x.txt")
    assert p.placeholders == {"instruction", "style"}
    with pytest.raises(ConfigError, match=r"no value for placeholder\(s\) \['style'\]"):
        p.render(instruction="x")
    with pytest.raises(ConfigError, match=r"no placeholder for \['extra'\]"):
        p.render(instruction="x", style="y", extra="z")


def test_user_overrides_win_and_change_the_digest(shipped: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine.txt"
    mine.write_text("Q: $question\n", encoding="utf-8")
    assert load_prompt("generators", "demo", "ask", "en", {"ask": mine}).render(question="1+1") == "Q: 1+1\n"
    base = prompts_digest("generators", "demo", ("ask",), "en")
    over = prompts_digest("generators", "demo", ("ask",), "en", {"ask": mine})
    assert base != over
    mine.write_text("Question: $question\n", encoding="utf-8")
    assert prompts_digest("generators", "demo", ("ask",), "en", {"ask": mine}) != over
    check_overrides("demo", {"ask": mine}, ("ask",))
    with pytest.raises(ConfigError, match="no template 'tell'"):
        check_overrides("demo", {"tell": mine}, ("ask",))
    with pytest.raises(ConfigError, match="is not a file"):
        check_overrides("demo", {"ask": tmp_path / "missing.txt"}, ("ask",))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        load_prompt("generators", "demo", "ask", "en", {"ask": empty})
