"""Regenerate the harness figures quoted in README.md ("The harness").

The README shows what ``python3 -m meshd.testing --nodes 64`` prints, between
the markers ``<!-- figures:start -->`` and ``<!-- figures:end -->``.  The
harness is deterministic for a seed (virtual time, seeded generators), so the
block is a pure function of the code: this script runs the command and puts
its output there, and ``tests/test_readme_figures.py`` fails when the README
no longer matches.  The harness's last line (its own wall time) varies from
run to run and is left out.

    python3 scripts/readme_figures.py          # rewrite the block in README.md
    python3 scripts/readme_figures.py --check  # write nothing; exit 1 when stale

Exit status: 0 done (or up to date), 1 stale (``--check``), 2 the README has
no well-formed block or the harness failed; one sentence on stderr for 1 and 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START = "<!-- figures:start -->"
END = "<!-- figures:end -->"
#: The command the README names, word for word (its default seed is 1).
HARNESS_ARGS = ("-m", "meshd.testing", "--nodes", "64")
COMMAND = "python3 " + " ".join(HARNESS_ARGS)
#: The one line of the harness's output that is not a function of the seed.
WALL_TIME_PREFIX = "wall time"
REGENERATE = "python3 scripts/readme_figures.py"


class FiguresError(Exception):
    """The README or the harness cannot give a block; the message is one sentence."""


def harness_figures(root: Path = ROOT) -> list[str]:
    """The lines ``COMMAND`` prints for the code in ``root``, without the wall time."""
    env = dict(os.environ)
    # The tree's own code, not whatever meshd an editable install points at.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, *HARNESS_ARGS],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output on stderr"]
        raise FiguresError(f"{COMMAND} exited with status {done.returncode}: {tail[0]}")
    lines = [line.rstrip() for line in done.stdout.splitlines()]
    return [line for line in lines if line and not line.startswith(WALL_TIME_PREFIX)]


def figures_block(lines: list[str]) -> str:
    """The Markdown that goes between the markers: one fenced block of ``lines``."""
    return "\n".join(["```", *lines, "```"])


def _span(text: str) -> tuple[int, int]:
    """Where the block between the markers starts and ends in ``text``."""
    starts, ends = text.count(START), text.count(END)
    if starts != 1 or ends != 1:
        raise FiguresError(
            f"README.md must hold {START} and {END} once each (found {starts} and {ends})"
        )
    begin = text.index(START) + len(START)
    end = text.index(END)
    if end < begin:
        raise FiguresError(f"README.md has {END} before {START}")
    return begin, end


def current_block(text: str) -> str:
    """The block between the markers in ``text``, without the surrounding newlines."""
    begin, end = _span(text)
    return text[begin:end].strip("\n")


def replace_block(text: str, block: str) -> str:
    """``text`` with the block between the markers replaced by ``block``."""
    begin, end = _span(text)
    return text[:begin] + "\n" + block + "\n" + text[end:]


def _write(path: Path, text: str) -> None:
    # Whole or not at all: a README cut short by a full disk would be worse
    # than a stale one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    shutil.copymode(path, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=REGENERATE,
        description=f"Put the output of `{COMMAND}` into README.md between {START} and {END}.",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when the README's block differs from the harness output",
    )
    ap.add_argument("--readme", type=Path, default=README, help="(default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        text = args.readme.read_text(encoding="utf-8")
        current_block(text)  # a README without the markers fails before the long run
        block = figures_block(harness_figures())
    except (FiguresError, OSError) as exc:
        print(f"{REGENERATE}: error: {exc}", file=sys.stderr)
        return 2
    if current_block(text) == block:
        return 0
    if args.check:
        print(
            f"{args.readme.name}: the harness figures are stale (they differ from what"
            f" `{COMMAND}` prints now); regenerate them with `{REGENERATE}`",
            file=sys.stderr,
        )
        return 1
    _write(args.readme, replace_block(text, block))
    print(f"{args.readme}: figures updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
