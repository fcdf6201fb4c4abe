"""The README stays current: its harness figures come from ``scripts/readme_figures.py``,
its documentation list names every file in docs/, and no link in the docs leads
outside the repository or to a heading that does not exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "readme_figures.py"


def _load_script() -> ModuleType:
    # scripts/ is not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rf = _load_script()

DOC = "intro\n\n<!-- figures:start -->\n```\nold line\n```\n<!-- figures:end -->\n\nafter\n"


def test_replace_block_changes_only_what_is_between_the_markers() -> None:
    new = rf.replace_block(DOC, rf.figures_block(["join: 1", "spread: 2"]))
    assert new == (
        "intro\n\n<!-- figures:start -->\n```\njoin: 1\nspread: 2\n```\n"
        "<!-- figures:end -->\n\nafter\n"
    )
    assert rf.current_block(new) == "```\njoin: 1\nspread: 2\n```"
    # Idempotent: regenerating the same figures leaves the file as it is.
    assert rf.replace_block(new, rf.current_block(new)) == new


@pytest.mark.parametrize(
    "text",
    [
        "no markers at all\n",
        "<!-- figures:start -->\nonly the start\n",
        "<!-- figures:end -->\n<!-- figures:start -->\n",
        DOC + DOC,
    ],
    ids=["none", "start-only", "reversed", "twice"],
)
def test_a_readme_without_one_well_formed_block_is_refused(text: str) -> None:
    with pytest.raises(rf.FiguresError):
        rf.replace_block(text, "```\nx\n```")


def test_the_readme_holds_one_block_of_harness_lines() -> None:
    block = rf.current_block(rf.README.read_text(encoding="utf-8"))
    lines = block.splitlines()
    assert lines[0] == "```" and lines[-1] == "```"
    assert lines[1].startswith("join: 64 nodes through one seed")
    assert not any(line.startswith(rf.WALL_TIME_PREFIX) for line in lines)


def _fake_harness(monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> None:
    monkeypatch.setattr(rf, "harness_figures", lambda root=rf.ROOT: list(lines))


def test_check_on_a_stale_block_exits_1_names_the_command_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(DOC, encoding="utf-8")
    _fake_harness(monkeypatch, ["join: new"])
    assert rf.main(["--check", "--readme", str(readme)]) == 1
    assert readme.read_text(encoding="utf-8") == DOC
    assert "python3 scripts/readme_figures.py" in capsys.readouterr().err


def test_check_on_a_current_block_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(DOC, encoding="utf-8")
    _fake_harness(monkeypatch, ["old line"])
    assert rf.main(["--check", "--readme", str(readme)]) == 0


def test_without_check_the_block_is_rewritten_and_the_rest_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(DOC, encoding="utf-8")
    _fake_harness(monkeypatch, ["join: new", "spread: new"])
    assert rf.main(["--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text == rf.replace_block(DOC, "```\njoin: new\nspread: new\n```")
    assert text.startswith("intro\n") and text.endswith("after\n")
    assert not (tmp_path / "README.md.tmp").exists()


def test_a_readme_without_markers_is_refused_before_the_harness_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no block\n", encoding="utf-8")

    def must_not_run(root: Path = rf.ROOT) -> list[str]:
        raise AssertionError("the harness ran for a README it cannot update")

    monkeypatch.setattr(rf, "harness_figures", must_not_run)
    assert rf.main(["--readme", str(readme)]) == 2
    assert readme.read_text(encoding="utf-8") == "no block\n"


@pytest.mark.slow
def test_readme_figures_are_current() -> None:
    """The README's block is exactly what the harness prints now (about 25 s)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, (
        f"README.md's harness figures are stale; regenerate them with"
        f" `python3 scripts/readme_figures.py`.\n{done.stderr}"
    )


# ---------------------------------------------------------------------------
# The documentation list and the links between documents.

DOCS = sorted((ROOT / "docs").glob("*.md"))
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes for ``path``: lower case, punctuation
    dropped, spaces made hyphens."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = m.group(1).strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-"))
    return out


def test_the_readme_lists_every_document() -> None:
    readme = rf.README.read_text(encoding="utf-8")
    missing = [d.name for d in DOCS if f"(docs/{d.name})" not in readme]
    assert DOCS and not missing, f"README.md's Documentation list lacks {missing}"


@pytest.mark.parametrize("doc", [rf.README, *DOCS], ids=lambda p: p.name)
def test_links_stay_inside_the_repository_and_find_their_heading(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    bad = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address, not a file
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.is_relative_to(ROOT) or not dest.exists():
            bad.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no such heading")
    assert not bad, f"{doc.name}: " + "; ".join(bad)
