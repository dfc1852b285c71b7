"""The task taxonomy: the shipped files agree with each other, and every kind of bad file is refused on load with
an error that names the file and the kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thresher.errors import ConfigError
from thresher.rewriters import load_taxonomy
from thresher.rewriters.taxonomy import TaskKind, shipped_path


def test_shipped_taxonomies_have_the_same_kinds_in_both_languages() -> None:
    en, zh = load_taxonomy("en"), load_taxonomy("zh")
    assert en.kinds == zh.kinds and 40 <= len(en) <= 50 and en.kinds[-1] == "default"
    for a, b in zip(en, zh, strict=True):
        assert (a.keep, a.needs_evidence) == (b.keep, b.needs_evidence), a.name
        assert (a.format is None) == (b.format is None) == a.keep, a.name
    evidence = {k.name for k in en if k.needs_evidence}
    assert {"open_qa", "fact_checking", "how_to", "recommendations", "answer_explanation"} == evidence
    kept = {k.name for k in en if k.keep}
    assert {"story_writing", "poem_writing", "roleplay", "paraphrase", "summarization", "title_writing"} <= kept
    assert isinstance(en["math_problem"], TaskKind) and "math_problem" in en and "nope" not in en
    with pytest.raises(AttributeError):
        en["open_qa"].keep = True  # type: ignore[misc]
    with pytest.raises(KeyError, match="valid:"):
        en["nope"]


def test_digest_is_content_not_path(tmp_path: Path) -> None:
    copy = tmp_path / "mine.json"
    copy.write_text(shipped_path("en").read_text(encoding="utf-8"), encoding="utf-8")
    assert load_taxonomy(path=copy).digest() == load_taxonomy().digest()
    assert load_taxonomy("zh").digest() != load_taxonomy().digest()
    changed = load_taxonomy(extend={"open_qa": {"format": "One line."}})
    assert changed.digest() != load_taxonomy().digest()
    assert changed["open_qa"].format == "One line." and changed["open_qa"].needs_evidence  # other fields kept


def test_extend_adds_and_overrides_kinds_from_files_and_mappings(tmp_path: Path) -> None:
    ext = tmp_path / "ext.json"
    ext.write_text(json.dumps({"chitchat": {"description": "Small talk.", "keep": True}}))
    tax = load_taxonomy(extend=[ext, {"chitchat": {"needs_evidence": True}}])
    assert tax.kinds[-1] == "chitchat" and tax["chitchat"].keep and tax["chitchat"].needs_evidence
    assert str(ext) in tax.sources


BAD = [
    ({"default": {"description": "x", "format": "y", "colour": "red"}}, r"kind 'default': unknown key\(s\) \['colour'\]"),
    ({"default": {"description": " ", "format": "y"}}, r"kind 'default': 'description' must be a non-empty string"),
    ({"default": {"description": "x", "format": ""}}, r"kind 'default': 'format' must be a non-empty string"),
    ({"default": {"description": "x"}}, r"kind 'default': no 'format' criterion"),
    ({"default": {"description": "x", "format": "y", "keep": "yes"}}, r"'keep' must be true or false"),
    ({"default": {"format": "y"}}, r"kind 'default': no 'description'"),
    ({"default": {"description": "two\nlines", "format": "y"}}, r"must be one line"),
    ({"Open QA": {"description": "x", "format": "y"}}, r"kind 'Open QA': kind names are snake_case"),
    ({"open_qa": {"description": "x", "format": "y"}}, r"the kind 'default' is missing"),
    ([], r"expected a non-empty JSON object"),
]


@pytest.mark.parametrize(("content", "message"), BAD)
def test_bad_files_are_refused_naming_file_and_kind(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message) as e:
        load_taxonomy(path=path)
    assert str(path) in str(e.value)


def test_unreadable_files_and_bad_extensions(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    path.write_text('{"default": {"description": "x",')
    with pytest.raises(ConfigError, match=rf"{path}: not valid JSON \(line 1"):
        load_taxonomy(path=path)
    with pytest.raises(ConfigError, match="no such file"):
        load_taxonomy(path=tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"extend\[1\], kind 'new': no 'format' criterion"):
        load_taxonomy(extend=[{"open_qa": {"keep": True}}, {"new": {"description": "A new kind."}}])
    with pytest.raises(ConfigError, match="unknown language 'fr'"):
        load_taxonomy("fr")
