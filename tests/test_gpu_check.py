"""benchmarks/gpu_check.sh stays in step with the docs: its --dry-run commands are the paper-table
commands of docs/reproducing.md, and docs/performance.md documents the script. (The script itself
is rehearsed on a CPU with `benchmarks/gpu_check.sh --rehearse`; too slow for a unit test.)"""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _joined(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def test_the_dry_runs_are_the_paper_tables_commands():
    docs = (ROOT / "docs" / "reproducing.md").read_text()
    wanted = []
    for section in re.split(r"^## ", docs, flags=re.M):
        if re.match(r"Table (II|III|IV|V|VI)\b", section):
            for line in _joined(section):
                if line.startswith("gileak bench --profile paper"):
                    tokens = shlex.split(line)[4:]
                    at = tokens.index("--out")
                    wanted.append(tokens[:at] + tokens[at + 2:])
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    ran = [shlex.split(line)[3:] for line in _joined(script) if line.startswith("dry table")]
    assert len(wanted) == 11 and sorted(ran) == sorted(wanted)


def test_performance_md_documents_the_check_and_the_wheels():
    text = (ROOT / "docs" / "performance.md").read_text()
    assert "benchmarks/gpu_check.sh" in text and "benchmarks/gpu_wheels.sh" in text and "--rehearse" in text
    assert "gpu-wheels/" in (ROOT / ".gitignore").read_text()
