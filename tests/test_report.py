"""The HTML run report: built on a real run (Load, TextStats, EvolInstruct and LLMJudge on the scripted server,
Concat, ExactDedup, NearDedup with the bundled MiniLM, Threshold, TopK beside RandomSelect), its sections and
numbers checked against the run's own tables; `thresher report` and the report `thresher run` writes; and the page
opened in headless Chromium (no console errors, every figure drawn, the row browser filters), with a screenshot."""

from __future__ import annotations

import html
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from thresher.cli import main
from thresher.data.steps import Concat, Load
from thresher.filters.exact_dedup import ExactDedup
from thresher.filters.near_dedup import NearDedup
from thresher.filters.select import RandomSelect, Threshold, TopK
from thresher.generators import EvolInstruct
from thresher.llms.testing import FaultConfig, FaultServer, Rule
from thresher.pipelines import Pipeline
from thresher.pipelines.runner import RunResult, open_run
from thresher.report import build_report, write_report
from thresher.scorers import TextStats
from thresher.scorers.judge import LLMJudge

DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "llama-factory-demo" / "alpaca_en_demo.json"
ANSWER = "A full answer that walks through the task, names what matters and ends with a clear result."
SECTIONS = ("overview", "dag", "reasons", "scores", "selection", "embeddings", "lineage", "rows", "usage", "timings")


def script() -> list[Rule]:
    return [
        # the judge: a score per prompt, spread over 1..5 by a hash of the prompt
        Rule(match="Judge only one thing", reply=[f"{s}\nBecause." for s in ("1", "2", "3", "3.5", "4", "4.5", "5")],
             pick="hash", name="judge"),
        # the evolver appends a sentence; equality always says the evolution is new; answers: some refusals
        Rule(match=r"(?s)#Given Prompt#:\n(.*?)\n\n#(?:Rewritten|Created) Prompt#:", reply=r"\1 Explain each step.",
             name="evolve"),
        Rule(match="Compare the two instructions", reply="Not Equal", name="equal"),
        Rule(match="Explain each step", role="last_user", reply=[ANSWER, ANSWER, "Sorry, I cannot."], pick="hash",
             name="answer"),
    ]


def build_run(server: FaultServer, run_dir: Path, rows: int = 60) -> RunResult:
    server.configure(script=script())
    backend = {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "retry_base_delay": 0.01,
               "max_retries": 1}  # fmt: skip
    p = Pipeline("report-test")
    p.add(Load(path=str(DEMO), limit=rows), name="load")
    p.add(TextStats(), name="stats", after=["load"])
    p.add(EvolInstruct(backend=backend, rounds=2, seed=1), name="evolve", after=["stats"])
    p.add(Concat(), name="pool", after=["stats", "evolve"])
    p.add(LLMJudge(backend=backend, dimensions=["accuracy"]), name="judge", after=["pool"])
    p.add(ExactDedup(), name="exact", after=["judge"])
    p.add(NearDedup(threshold=0.9), name="near", after=["exact"])
    p.add(Threshold(column="judge_accuracy", minimum=3.0), name="good", after=["near"])
    p.add(TopK(column="judge_accuracy", k=20), name="top20", after=["good"])
    p.add(RandomSelect(budget=20, seed=0), name="random20", after=["good"])
    return p.run(run_dir, progress=False)


@pytest.fixture(scope="module")
def report_run(fault_server: FaultServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunResult, Path]]:
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THRESHER_CACHE", str(tmp / "requests.sqlite"))
        mp.delenv("THRESHER_NO_CACHE", raising=False)
        result = build_run(fault_server, tmp / "run")
    defaults = FaultConfig()  # the session's server goes back to its defaults for the tests after these
    fault_server.configure(**{k: getattr(defaults, k) for k in defaults.__dataclass_fields__})
    fault_server.reset()
    t0 = time.perf_counter()
    path = write_report(result.run_dir)
    print(f"report of {len(result.steps)} steps written in {time.perf_counter() - t0:.1f}s ({path.stat().st_size:,} bytes)")
    yield result, path


def section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"no section {sid!r}"
    return m.group(1)


def table_rows(fragment: str) -> list[list[str]]:
    body = re.search(r"<tbody>(.*?)</tbody>", fragment, re.S)
    assert body
    rows = []
    for tr in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S):
        rows.append([html.unescape(re.sub(r"<[^>]+>", "", td)).strip() for td in re.findall(r"<td>(.*?)</td>", tr, re.S)])
    return rows


def sampled(path: Path) -> list[dict[str, object]]:
    """The row browser's rows, as the page embeds them."""
    m = re.search(r'<script id="rb-data" type="application/json">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)
    assert m
    rows: list[dict[str, object]] = json.loads(m.group(1))
    return rows


def test_report_sections_and_numbers(report_run: tuple[RunResult, Path]) -> None:
    result, path = report_run
    page = path.read_text(encoding="utf-8")
    for sid in SECTIONS:
        section(page, sid)
    assert '<section id="training">' not in page  # no train step ran
    # self-contained: no script, style, image or link fetched from anywhere
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<script src" not in page and "<link" not in page

    # accounting: one row per step, the manifest's numbers
    acc = {r[0]: r for r in table_rows(section(page, "dag"))}
    assert list(acc) == list(result.steps)
    for name, rec in result.steps.items():
        assert acc[name][5:8] == [f"{rec.rows_out:,}", f"{rec.rows_rejected:,}", f"{rec.rows_failed:,}"], name

    # rejection reasons: every rejected row of the threshold step is counted under one pattern
    reasons = section(page, "reasons")
    good = result.steps["good"].rows_rejected
    assert good and re.search(rf"<td>{good}</td><td>100%</td><td>judge_accuracy # &lt; minimum #</td>", reasons)
    near = result.rejected("near")
    assert near.num_rows and f"{near.num_rows} rejected" in reasons and "near duplicate of kept row" in reasons

    # the histogram counts every scored row; the threshold and the top-k cut-off are drawn (named in the legend)
    scores = section(page, "scores")
    assert scores.count('<img class="plot"') == 1 and 'alt="histogram of judge_accuracy"' in scores

    # selection vs random: the means in the table are the means of the steps' outputs
    comp = {r[0]: r[1:] for r in table_rows(section(page, "selection"))}
    means = [np.mean(result.table(n).column("judge_accuracy").to_numpy()) for n in ("good", "top20", "random20")]
    assert comp["judge_accuracy"] == [f"{m:.3f}" for m in means]
    assert means[1] >= means[2]  # the top 20 by the score beats a random 20 on it

    # lineage: chains start at a seed of the input and go through the rounds in order
    lineage = section(page, "lineage")
    assert "round 2 · " in lineage and ">seed<" in lineage

    # the row browser's sample: kept rows are in the step's output, rejected ones carry their reason
    rows = sampled(path)
    assert {r["step"] for r in rows} == set(result.steps)
    top_ids = set(result.table("top20").column("id").to_pylist())
    kept = [r for r in rows if r["step"] == "top20" and r["status"] == "kept"]
    assert kept and all(r["id"] in top_ids and "judge_accuracy" in r["scores"] for r in kept)
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert rejected and all(r["reason"] for r in rejected)

    # usage: the judge's requests and tokens as its metrics recorded them
    usage = {r[0]: r for r in table_rows(section(page, "usage"))}
    m = result.metrics("judge")
    assert usage["judge"][1:4] == [f"{m['requests']:,}", f"{m['prompt_tokens']:,}", f"{m['completion_tokens']:,}"]
    assert "evolve" in usage and "load" not in usage


def test_sections_appear_only_with_their_data(tmp_path: Path) -> None:
    p = Load(path=str(DEMO), limit=30) >> TextStats() >> ExactDedup()
    result = p.run(tmp_path / "run", progress=False)
    page = build_report(result.run_dir)
    assert {"overview", "dag", "rows", "timings"} <= set(re.findall(r'<section id="(\w+)">', page))
    for sid in ("scores", "selection", "embeddings", "lineage", "usage", "training"):
        assert f'<section id="{sid}">' not in page, sid


def test_training_curve_from_the_trainers_log(tmp_path: Path) -> None:
    from thresher.trainer.metrics import MetricsWriter

    result = (Load(path=str(DEMO), limit=10) >> TextStats()).run(tmp_path / "run", progress=False)
    writer = MetricsWriter(result.run_dir / "train", tensorboard=False)
    for step in range(1, 6):
        writer.write({"kind": "train", "step": step, "loss": 2.0 / step, "tokens_per_s": 100.0 + step, "mfu": 0.01})
    writer.write({"kind": "eval", "step": 5, "eval_loss": 0.55})
    writer.close()
    train = section(build_report(result.run_dir), "training")
    assert "train/metrics.jsonl" in train and "5 logged steps" in train and "final train loss 0.4000" in train
    assert "final eval loss 0.5500" in train and "mean 103 tokens/s" in train and '<img class="plot"' in train


def test_cli_report_and_the_report_of_thresher_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsteps:\n  load:\n    step: Load\n    params: {{path: {DEMO}, limit: 20}}\n"
                      "  stats:\n    step: TextStats\n")  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(recipe), "--out", str(tmp_path / "run"), "-q"])
    assert res.exit_code == 0, res.output
    assert "thresher run report: r" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")

    res = runner.invoke(main, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere.html")])
    assert res.exit_code == 0 and (tmp_path / "elsewhere.html").is_file(), res.output

    # a report that cannot be written is logged; the run still succeeds
    def broken(*a: object, **k: object) -> Path:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("thresher.report.write_report", broken)
    res = runner.invoke(main, ["run", str(recipe), "--out", str(tmp_path / "run2"), "-q"])
    assert res.exit_code == 0 and "the run report was not written: RuntimeError: disk on fire" in res.output
    assert open_run(tmp_path / "run2").steps["stats"].status == "done"


# ---- the page in a real browser ----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_report_in_headless_chromium(report_run: tuple[RunResult, Path], tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    result, path = report_run
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(path.resolve().as_uri())
        driver.execute_script("return document.readyState")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors

        # every figure decoded and laid out with a size
        plots = driver.execute_script(
            "return Array.from(document.querySelectorAll('img.plot')).map(i => "
            "[i.alt, i.complete, i.naturalWidth, i.getBoundingClientRect().width, i.getBoundingClientRect().height])"
        )
        assert len(plots) >= 7, plots
        for alt, complete, natural, w, h in plots:
            assert complete and natural > 0 and w > 0 and h > 0, alt

        # the row browser: all sampled rows (first page) before, only matching rows after typing
        count = driver.find_element(By.ID, "rb-count")
        total = int(re.search(r"of (\d+) sampled", count.text).group(1))
        assert total > 60 and count.text.startswith("first 60 of")
        target = result.rejected("good").column("id")[0].as_py()
        search = driver.find_element(By.ID, "rb-search")

        def type_in(text: str) -> None:  # select-all + delete fires the input event that clear() does not
            search.send_keys(Keys.CONTROL, "a")
            search.send_keys(Keys.DELETE)
            search.send_keys(text)

        Select(driver.find_element(By.ID, "rb-step")).select_by_value("good")
        Select(driver.find_element(By.ID, "rb-status")).select_by_visible_text("rejected")
        type_in("minimum")
        shown = driver.find_elements(By.CSS_SELECTOR, "#rb-table tbody tr")
        assert shown and all(tr.find_elements(By.TAG_NAME, "td")[0].text == "good" for tr in shown)
        assert all(tr.find_elements(By.TAG_NAME, "td")[1].text == "rejected" for tr in shown)
        assert re.match(rf"{len(shown)} matching, of {total} sampled rows", count.text), count.text
        assert len(shown) == min(60, sum(r["step"] == "good" and r["status"] == "rejected" for r in sampled(path)))
        Select(driver.find_element(By.ID, "rb-step")).select_by_value("")
        Select(driver.find_element(By.ID, "rb-status")).select_by_value("")
        type_in(target)
        ids = [tr.find_elements(By.TAG_NAME, "td")[2].text for tr in driver.find_elements(By.CSS_SELECTOR, "#rb-table tbody tr")]
        assert ids and set(ids) == {target}
        type_in("no row says this zzqx")
        assert not driver.find_elements(By.CSS_SELECTOR, "#rb-table tbody tr") and count.text.startswith("0 matching")
        type_in(" ")  # back to every row for the screenshot

        assert not [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(height + 120, 16000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 50_000
        print(f"screenshot: {shot} ({height} px tall page)")
    finally:
        driver.quit()


def test_a_failed_run_gets_a_report_naming_the_failed_step(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    good = json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."})
    data.write_text(f"{good}\n{{\"instruction\": 3, \"output\": [\n{good}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: broken\nsteps:\n  load:\n    step: Load\n    params: {{path: {data}}}\n"
                      "  stats:\n    step: TextStats\n")  # fmt: skip
    res = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "run"), "-q"])
    assert res.exit_code != 0
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    overview = section(page, "overview")
    assert "<b>load</b> failed:" in overview and "rows.jsonl" in overview
    assert re.search(r'<span class="st pending">pending</span>', section(page, "dag"))
