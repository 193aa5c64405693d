"""Shared by every benchmark script: timing helpers and the BENCHMARKS.md writer.

Each script writes its own section to ``benchmarks/results/NAME.PROFILE.md``, PROFILE being
the edgeloop target profile of the CPU it ran on, so a run on one kind of CPU keeps the
other kind's figures beside it; BENCHMARKS.md is rebuilt from all sections, so scripts can
be rerun one at a time.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    """One line describing this machine (with the edgeloop target profile it is detected
    as) and the software versions that matter."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    from edgeloop.targets import detect

    return (f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, "
            f"edgeloop target profile {detect().name}, "
            f"Python {platform.python_version()}, onnxruntime {ort.__version__}, "
            f"torch {torch.__version__}")


def claims_table(verdict: dict[str, bool]) -> list[str]:
    """A markdown table of claims (each stated with its measured figure) and whether each
    holds."""
    return ["| claim | holds |", "|---|---|",
            *(f"| {claim} | {'yes' if holds else '**no**'} |" for claim, holds in verdict.items())]


def stamp() -> str:
    """When and from what this measurement ran: "YYYY-MM-DD HH:MM UTC, commit abc1234"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {commit}"


def result_path(name: str, ext: str) -> Path:
    """``benchmarks/results/NAME.PROFILE.EXT``: a result of this machine's target profile,
    kept beside the other profiles' (the folder is created)."""
    from edgeloop.targets import detect

    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.{detect().name}.{ext}"


def write_section(name: str, title: str, body: str) -> Path:
    """Write this script's section for this machine's target profile (with machine, date
    and command) and rebuild BENCHMARKS.md from every section."""
    from edgeloop.targets import detect

    profile = detect().name
    command = "python " + " ".join(shlex.quote(a) for a in [
        os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    header = (f"## {title} ({profile})\n\n"
              f"- machine: {machine()}\n"
              f"- date: {stamp()}\n"
              f"- command: `{command}`\n\n")
    path = result_path(name, "md")
    path.write_text(header + body.rstrip() + "\n")
    rebuild()
    return path


def rebuild() -> None:
    """Rewrite BENCHMARKS.md from every section in ``benchmarks/results/``."""
    sections = sorted(RESULTS.glob("*.md"))
    text = ("# edgeloop benchmarks\n\n"
            "Written by the scripts in `benchmarks/` (`make bench` runs them all). Every "
            "latency is the median of repeated runs; every ratio compares against a baseline "
            "measured in the same run on the same machine.\n\n"
            + "\n".join(s.read_text() for s in sections))
    (ROOT / "BENCHMARKS.md").write_text(text)


if __name__ == "__main__":
    rebuild()
