"""flatlab.report: tables hold the analysis numbers, every figure is referenced, gaps omitted."""

from __future__ import annotations

import copy
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flatlab.analysis.results import CheckpointResult
from flatlab.errors import FlatlabError
from flatlab.report import (
    COMPARISON_CSV,
    METHOD_COLORS,
    checkpoint_colors,
    markdown_table,
    relative_change,
    write_report,
)

# Numbers chosen so that every displayed value is exact at the report's precision.
CHECKPOINTS = {
    # name: (optimizer, kwargs, test_acc, train_acc, train_loss, trace, stderr, eigenvalues)
    "sam": ("sam", {"lr": 0.1, "momentum": 0.9, "rho": 0.05}, 0.75, 0.875, 0.25, 200.0, 4.0,
            [50.0, 25.0, 12.5]),
    "sgd": ("sgd", {"lr": 0.1, "momentum": 0.9}, 0.625, 0.9375, 0.125, 400.0, 8.0,
            [100.0, 40.0, 20.0]),
    "nso": ("nso", {"lr": 0.1, "momentum": 0.9, "sigma": 0.01, "num_perturbs": 1}, 0.8125, 0.875,
            0.375, 100.0, 2.0, [40.0, 20.0, 10.0]),
}
ALPHAS_2D, BETAS_2D = np.linspace(-1, 1, 7), np.linspace(-0.5, 0.5, 5)  # non-square on purpose


def make_checkpoint(name: str, index: int) -> dict:
    method, kwargs, test_acc, train_acc, train_loss, tr, se, eig = CHECKPOINTS[name]
    grid = np.linspace(-5.0, 120.0, 200)
    density = np.exp(-0.5 * (grid / 2.0) ** 2) + 1e-3 * np.exp(-0.5 * ((grid - eig[0]) / 2.0) ** 2)
    density /= np.trapezoid(density, grid)
    alphas = np.linspace(-1, 1, 11)
    loss_2d = [[0.1 + (index + 1) * a**2 + 3 * b**2 for b in BETAS_2D] for a in ALPHAS_2D]
    return {
        "name": name, "path": f"runs/{name}/model.safetensors", "run_dir": None,
        "model": {"name": "mlp", "kwargs": {"hidden": 32}},
        "dataset": {"name": "mnist1d", "seed": 0, "kwargs": {}},
        "optimizer": {"name": method, "kwargs": kwargs},
        "epoch": 5, "grad_evals": 1000 * (index + 1), "seed": 7 + index,
        "metrics": {"train_loss": train_loss, "train_acc": train_acc, "test_loss": 1.5,
                    "test_acc": test_acc},
        "loss": 0.5, "accuracy": 0.75,
        "trace": tr, "trace_stderr": se, "trace_matvecs": 99, "trace_method": "hutch++",
        "trace_per_layer": {"fc.weight": {"estimate": tr, "stderr": se}},
        "eigenvalues": eig, "eigenvalue_residuals": [1e-6] * 3,
        "eigen_converged": [True, True, name != "nso"], "eigen_matvecs": 60,
        "density": {"grid": grid.tolist(), "density": density.tolist(),
                    "nodes": [[0.0]], "weights": [[1.0]]},
        "landscape_1d": {"alphas": alphas.tolist(),
                         "loss": (0.1 + (index + 1) * alphas**2).tolist(),
                         "accuracy": (0.9 - 0.1 * alphas**2).tolist()},
        "landscape_2d": {"alphas": ALPHAS_2D.tolist(), "betas": BETAS_2D.tolist(),
                         "loss": loss_2d, "accuracy": [[0.5] * len(BETAS_2D)] * len(ALPHAS_2D)},
    }


def make_analysis(names=("sam", "sgd", "nso")) -> dict:
    t = np.linspace(0, 1, 9)
    return {
        "flatlab_version": "0.1.0", "command": "python -m flatlab.analyze runs/sam runs/sgd",
        "samples": 1000, "seed": 3, "mode": "eval",
        "checkpoints": [make_checkpoint(n, i) for i, n in enumerate(names)],
        "interpolation": {"from": names[0], "to": names[-1], "alphas": t.tolist(),
                          "loss": (0.2 + np.sin(np.pi * t)).tolist(),
                          "accuracy": (0.8 - 0.1 * t).tolist()},
    }


def make_metrics(names=("sam", "sgd", "nso")) -> dict[str, pd.DataFrame]:
    epochs = np.arange(1, 6)
    return {n: pd.DataFrame({"epoch": epochs, "train_loss": 1.0 / epochs,
                             "train_acc": 1 - 0.5 / epochs,
                             "test_loss": 1.2 / epochs, "test_acc": 0.9 - 0.5 / epochs,
                             "seconds": 0.1 * epochs, "grad_evals": 100 * (i + 1) * epochs,
                             "lr": 0.1})
            for i, n in enumerate(names)}


class PageParser(HTMLParser):
    """Tables (by class) as lists of rows of cell text, and every <img src>."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", "").split()[-1], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def markdown_summary(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    block = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows if "---" not in r]


def summary_rows(path: Path) -> dict[str, dict[str, str]]:
    header, *rows = parse_page(path).tables["summary"]
    return {row[0].replace(" (baseline)", ""): dict(zip(header, row, strict=True)) for row in rows}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[dict, Path]:
    """One report of three checkpoints with every section, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("report")
    analysis = make_analysis()
    write_report(analysis, out, metrics=make_metrics())
    return analysis, out


def expected_rel(x: float, base: float) -> str:
    return f"{100 * (x - base) / abs(base):+.1f}%"


def test_csv_holds_exactly_the_analysis_numbers(full_report):
    analysis, tmp_path = full_report
    table = pd.read_csv(tmp_path / COMPARISON_CSV).set_index("name")
    assert list(table.index) == ["sam", "sgd", "nso"]
    for ck in analysis["checkpoints"]:
        row = table.loc[ck["name"]]
        assert row["optimizer"] == ck["optimizer"]["name"]
        assert row["hyperparameters"] == ", ".join(
            f"{k}={v:g}" for k, v in sorted(ck["optimizer"]["kwargs"].items()))
        assert row["epoch"] == ck["epoch"] and row["grad_evals"] == ck["grad_evals"]
        for key in ("test_acc", "train_acc", "train_loss", "test_loss"):
            assert row[key] == ck["metrics"][key]
        assert row["gap"] == ck["metrics"]["train_acc"] - ck["metrics"]["test_acc"]
        assert (row["trace"], row["trace_stderr"]) == (ck["trace"], ck["trace_stderr"])
        assert [row[f"lambda_{i}"] for i in (1, 2, 3)] == ck["eigenvalues"]
        assert (row["analysis_loss"], row["analysis_accuracy"]) == (ck["loss"], ck["accuracy"])


def test_default_baseline_is_the_sgd_run_not_the_first(full_report):
    _, tmp_path = full_report
    table = pd.read_csv(tmp_path / COMPARISON_CSV).set_index("name")
    assert table["baseline"].to_dict() == {"sam": False, "sgd": True, "nso": False}
    base = CHECKPOINTS["sgd"]
    for name, (_, _, acc, _, _, tr, _, eig) in CHECKPOINTS.items():
        assert table.loc[name, "rel_test_acc"] == pytest.approx((acc - base[2]) / base[2],
                                                               abs=1e-15)
        assert table.loc[name, "rel_trace"] == pytest.approx((tr - base[5]) / base[5], abs=1e-15)
        assert table.loc[name, "rel_lambda_1"] == pytest.approx((eig[0] - base[7][0]) / base[7][0],
                                                               abs=1e-15)
    rows = summary_rows(tmp_path / "index.html")
    assert rows["nso"]["Δ trace"] == "-75.0%" and rows["sam"]["Δ λ1"] == "-50.0%"
    assert rows["nso"]["Δ test acc"] == "+30.0%" and rows["sgd"]["Δ trace"] == "+0.0%"
    assert "sgd (baseline)" in [r[0] for r in parse_page(tmp_path / "index.html").tables["summary"]]


def test_named_baseline(tmp_path):
    write_report(make_analysis(), tmp_path, baseline="sam")
    rows = summary_rows(tmp_path / "index.html")
    base = CHECKPOINTS["sam"]
    for name, (_, _, acc, _, _, tr, _, eig) in CHECKPOINTS.items():
        assert rows[name]["Δ test acc"] == expected_rel(acc, base[2])
        assert rows[name]["Δ trace"] == expected_rel(tr, base[5])
        assert rows[name]["Δ λ1"] == expected_rel(eig[0], base[7][0])
    assert rows["sgd"]["Δ test acc"] == "-16.7%" and rows["nso"]["Δ λ1"] == "-20.0%"
    with pytest.raises(FlatlabError, match="'adam'.*sam, sgd, nso"):
        write_report(make_analysis(), tmp_path / "x", baseline="adam")


def test_without_sgd_the_first_checkpoint_is_the_baseline(tmp_path):
    write_report(make_analysis(("nso", "sam")), tmp_path)
    assert pd.read_csv(tmp_path / COMPARISON_CSV)["baseline"].tolist() == [True, False]


def test_displayed_numbers_and_markdown_table_match_html(full_report):
    _, tmp_path = full_report
    header, *rows = parse_page(tmp_path / "index.html").tables["summary"]
    assert markdown_summary(tmp_path / "report.md") == [header, *rows]
    shown = summary_rows(tmp_path / "index.html")
    nso = shown["nso"]
    assert nso["method"] == "nso"
    # settings common to all runs are stated once above the table, rows show what differs
    assert nso["hyperparameters"] == "num_perturbs=1, sigma=0.01"
    assert shown["sgd"]["hyperparameters"] == "" and shown["sam"]["hyperparameters"] == "rho=0.05"
    assert "Settings shared by every run: lr=0.1, momentum=0.9." in (
        tmp_path / "report.md").read_text(encoding="utf-8")
    assert (nso["epochs"], nso["grad evals"]) == ("5", "3000")
    assert (nso["test acc (%)"], nso["train loss"], nso["gap (pts)"]) == ("81.25", "0.375", "6.25")
    assert nso["loss at W"] == "0.5"  # analysis loss at the checkpoint's weights
    assert nso["trace ± s.e."] == "100 ± 2"
    # the third eigenvalue of nso did not converge: flagged with *
    assert (nso["λ1"], nso["λ2"], nso["λ3"]) == ("40", "20", "10*")
    assert shown["sam"]["λ3"] == "12.5" and shown["sgd"]["trace ± s.e."] == "400 ± 8"


def test_every_figure_exists_and_every_png_is_referenced(full_report):
    _, tmp_path = full_report
    index = tmp_path / "index.html"
    images = parse_page(index).images
    assert sorted(Path(s).name for s in images) == sorted(
        ["training_curves.png", "eigenvalues.png", "density.png", "landscape_1d.png",
         "landscape_2d.png", "interpolation.png"])
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)) == sorted(images)
    for src in images:
        assert not Path(src).is_absolute() and "://" not in src
        assert (tmp_path / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")}
    assert on_disk == set(images)
    assert not list(tmp_path.rglob("*.tmp"))


def test_single_checkpoint_report(tmp_path):
    analysis = make_analysis(("nso",))
    analysis["interpolation"] = None
    write_report(analysis, tmp_path)
    rows = summary_rows(tmp_path / "index.html")
    assert list(rows) == ["nso"]
    assert rows["nso"]["Δ trace"] == "+0.0%" and rows["nso"]["test acc (%)"] == "81.25"
    assert rows["nso"]["hyperparameters"] == "lr=0.1, momentum=0.9, num_perturbs=1, sigma=0.01"
    assert "Settings shared" not in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "interpolation.png" not in " ".join(parse_page(tmp_path / "index.html").images)


def test_missing_sections_are_omitted_and_stale_figures_removed(tmp_path):
    write_report(make_analysis(), tmp_path, metrics=make_metrics())
    bare = make_analysis(("sgd", "sam"))
    bare.pop("interpolation")
    for ck in bare["checkpoints"]:
        for key in ("eigenvalues", "eigen_converged", "density", "landscape_1d", "landscape_2d",
                    "trace", "trace_stderr"):
            ck[key] = None
    write_report(bare, tmp_path)
    html_text = (tmp_path / "index.html").read_text(encoding="utf-8")
    page = parse_page(tmp_path / "index.html")
    assert page.images == [] and list(tmp_path.rglob("*.png")) == []
    for heading in ("Eigenvalue density", "Training curves", "1-D loss slices", "Interpolation"):
        assert heading not in html_text
    header = page.tables["summary"][0]
    assert not any(h.startswith("λ") or "trace" in h for h in header)
    assert "Δ test acc" in header
    assert summary_rows(tmp_path / "index.html")["sam"]["Δ test acc"] == "+20.0%"


def test_partial_data_per_checkpoint(tmp_path):
    analysis = make_analysis()
    sam = analysis["checkpoints"][0]
    sam.update(density=None, landscape_2d=None, eigenvalues=[50.0], metrics={})
    analysis["checkpoints"][1]["trace"] = None  # the baseline lacks a trace: no Δ trace anywhere
    write_report(analysis, tmp_path, metrics={"nso": make_metrics()["nso"]})
    rows = summary_rows(tmp_path / "index.html")
    assert rows["sam"]["λ2"] == "n/a" and rows["sam"]["test acc (%)"] == "n/a"
    assert rows["sam"]["Δ test acc"] == "n/a" and "Δ trace" not in rows["nso"]
    assert rows["sgd"]["trace ± s.e."] == "n/a" and rows["nso"]["trace ± s.e."] == "100 ± 2"
    assert len(parse_page(tmp_path / "index.html").images) == 6


def test_metrics_and_config_are_read_from_run_dirs(tmp_path):
    analysis = make_analysis(("sgd", "nso"))
    for ck, (name, frame) in zip(analysis["checkpoints"], make_metrics(("sgd", "nso")).items(),
                                 strict=True):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        frame.to_csv(run_dir / "metrics.csv", index=False)
        (run_dir / "config.toml").write_text(f'optimizer = "{name}"\nseed = 11\n')
        ck["run_dir"] = str(run_dir)
    out = tmp_path / "report"
    write_report(analysis, out, command="python -m flatlab.demo --out reports/demo")
    html_text = (out / "index.html").read_text(encoding="utf-8")
    assert "figures/training_curves.png" in html_text
    assert 'optimizer = &quot;nso&quot;' in html_text and "seed = 11" in html_text
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert 'optimizer = "nso"' in markdown
    # the regenerating command stands at the top of both pages, the analysis command below
    for text in (html_text, markdown):
        head = text[: text.index("Summary")]
        assert "python -m flatlab.demo --out reports/demo" in head
        assert "python -m flatlab.analyze runs/sam runs/sgd" in text
    assert "1000" in html_text and "hutch++, 99 products" in html_text


def test_input_is_not_modified_and_empty_analysis_is_an_error(tmp_path):
    analysis = make_analysis()
    before = copy.deepcopy(analysis)
    assert write_report(analysis, tmp_path) == tmp_path / "index.html"
    assert analysis == before
    with pytest.raises(FlatlabError, match="no checkpoints"):
        write_report({"checkpoints": []}, tmp_path / "empty")


def test_colours_follow_the_method_and_stay_distinct():
    checkpoints = [CheckpointResult(name=n, optimizer={"name": m})
                   for n, m in [("a", "nso"), ("b", "sgd"), ("c", "nso"), ("d", "adamw")]]
    colors = checkpoint_colors(checkpoints)
    assert colors["a"] == METHOD_COLORS["nso"] and colors["b"] == METHOD_COLORS["sgd"]
    assert len(set(colors.values())) == 4


def test_relative_change_and_markdown_table():
    assert relative_change(75.0, 100.0) == -0.25 and relative_change(-3.0, -2.0) == -0.5
    assert relative_change(1.0, 0.0) is None and relative_change(None, 1.0) is None
    assert relative_change(math.nan, 1.0) is None
    frame = pd.DataFrame({"a": ["x|y"], "b": ["1"]})
    assert markdown_table(frame) == "| a | b |\n|---|---|\n| x\\|y | 1 |"


def test_demo_quick_end_to_end_reuses_runs_and_refuses_other_configs(tmp_path, monkeypatch,
                                                                      capsys):
    import json

    from flatlab.demo import main
    from flatlab.errors import run_cli

    monkeypatch.chdir(tmp_path)
    argv = ["--out", "demo", "--quick", "--epochs", "1", "--no-progress"]
    assert run_cli(main, argv, prog="flatlab.demo") == 0
    out = tmp_path / "demo"
    assert "report: demo/index.html" in capsys.readouterr().out
    analysis = json.loads((out / "analysis.json").read_text())
    assert [ck["name"] for ck in analysis["checkpoints"]] == ["sgd", "sam", "nso"]
    assert [ck["run_dir"] for ck in analysis["checkpoints"]] == [
        "demo/runs/sgd", "demo/runs/sam", "demo/runs/nso"]
    table = pd.read_csv(out / COMPARISON_CSV).set_index("name")
    for ck in analysis["checkpoints"]:
        assert table.loc[ck["name"], "trace"] == ck["trace"]
        assert table.loc[ck["name"], "test_acc"] == ck["metrics"]["test_acc"]
    assert table["baseline"].to_dict() == {"sgd": True, "sam": False, "nso": False}
    page = parse_page(out / "index.html")
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*.png")} | {
        p.relative_to(out).as_posix() for p in (out / "figures").glob("*.png")}
    assert on_disk == set(page.images) and "figures/training_curves.png" in on_disk
    assert "figures/density.png" in on_disk  # --quick keeps a (small) density
    assert not (out / "plots").exists()  # analyze's per-checkpoint figures are not drawn
    html_text = (out / "index.html").read_text(encoding="utf-8")
    top = html_text[: html_text.index("<h2>")]
    command = "python -m flatlab.demo --out demo --quick --epochs 1"  # --no-progress left out
    assert f"Regenerate with: <code>{command}</code>" in top

    models = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/model.safetensors")}
    assert len(models) == 3
    assert run_cli(main, argv, prog="flatlab.demo") == 0  # finished runs are reused
    assert {p: p.stat().st_mtime_ns for p in models} == models
    assert "sgd: reused" in capsys.readouterr().err

    assert run_cli(main, [*argv[:3], "--epochs", "2"], prog="flatlab.demo") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flatlab.demo: error:") and "epochs: 1 there, 2 here" in err
    assert {p: p.stat().st_mtime_ns for p in models} == models


# --------------------------------------------------------------------------- page model

def test_page_renders_one_block_list_to_markdown_and_html(tmp_path):
    from flatlab.reporting.page import (
        BulletList,
        Code,
        Figure,
        Heading,
        Page,
        Paragraph,
        Table,
    )

    frame = pd.DataFrame({"method": ["nso", "a|b"], "trace": ["1.5", None]})
    page = Page("T <1>", script="var x = 1;").add(
        Heading("Results"), Paragraph('See `x < y` and [the CSV](data.csv) "quoted"'),
        Table(frame, css_class="summary"), Figure("figures/a.png", "A", "caption `c`"),
        Code("k = 1\n", "toml"), BulletList(["one: `1`", "two"]), Heading("Deeper", 3))
    assert page.to_markdown() == (
        "# T <1>\n\n## Results\n\nSee `x < y` and [the CSV](data.csv) \"quoted\"\n\n"
        "| method | trace |\n|---|---|\n| nso | 1.5 |\n| a\\|b | n/a |\n\n"
        "![A](figures/a.png)\n\ncaption `c`\n\n```toml\nk = 1\n```\n\n- one: `1`\n- two\n\n"
        "### Deeper\n")
    html_text = page.to_html()
    assert html_text.startswith("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n")
    assert "<title>T &lt;1&gt;</title>" in html_text and "<h1>T &lt;1&gt;</h1>" in html_text
    assert ("<p>See <code>x &lt; y</code> and <a href=\"data.csv\">the CSV</a> "
            "&quot;quoted&quot;</p>\n") in html_text
    assert ('<figure><img src="figures/a.png" alt="A"><figcaption>caption <code>c</code>'
            "</figcaption></figure>\n") in html_text
    assert "<pre>k = 1\n</pre>\n" in html_text and "<h3>Deeper</h3>\n" in html_text
    assert "<ul>\n<li>one: <code>1</code></li>\n<li>two</li>\n</ul>\n" in html_text
    assert html_text.endswith("<script>var x = 1;</script>\n</body>\n</html>\n")
    parsed = PageParser()
    parsed.feed(html_text)
    assert parsed.tables["summary"] == [["method", "trace"], ["nso", "1.5"], ["a|b", "n/a"]]
    assert page.write(tmp_path) == tmp_path / "index.html"
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == page.to_markdown()
    assert (tmp_path / "index.html").read_text(encoding="utf-8") == html_text


def test_page_blocks_are_checked_and_links_stay_out_of_code():
    from flatlab.reporting.page import Heading, Page, Table, inline_html

    with pytest.raises(TypeError, match="not a page block"):
        Page("t").add("a string")
    with pytest.raises(ValueError, match="level"):
        Heading("title", 1)
    assert inline_html("`[a](b)` [c](d)") == '<code>[a](b)</code> <a href="d">c</a>'
    rows = Table([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}])  # rows work like a DataFrame
    assert Page("t").add(rows).to_markdown() == (
        "# t\n\n| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |\n")
