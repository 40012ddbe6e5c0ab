"""Every reference a committed file makes is to something in the repository.

No committed file may cite the background notes the developers kept outside the repository (the
paper digest, the code-anchor notes, the teaching notes, the reviews) or any path outside the
checkout; papers are cited by arXiv id, section and equation, or through docs/references.md.  Every
``docs/references.md §N`` citation must name a section that exists there.
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile("|".join([
    r"\b(?:papers|anchors|teaching)" + r"\.md\b",            # the developers' background notes
    r"(?:notebooks|kernels|reliability)-review" + r"\.md",  # ... and the reviews
    r"facts-diagnosis" + r"\.md",
    r"\.\./" + r"shared\b", r"\bshared/" + r"reference\b",     # the folder they live in
    r"(?<![\w.~-])/" + r"work/",                              # absolute paths of the development machines
]))
CITATION = re.compile(r"docs/references\.md`?\s+(?:§|Secs?\.)\s*(\d+(?:\.\d+)?)")


def committed_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for rel in listed.decode().split("\0"):
        path = ROOT / rel
        if rel and path.is_file():
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # binary
            files.append(path)
    return files


def test_no_committed_file_refers_to_a_path_outside_the_repository():
    hits = []
    for path in committed_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_citations_of_docs_references_name_existing_sections():
    headings = (ROOT / "docs" / "references.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3}\s+(\d+(?:\.\d+)?)[.\s]", headings, re.M))
    missing = []
    for path in committed_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            missing += [f"{path.relative_to(ROOT)}:{n}: §{s}" for s in CITATION.findall(line) if s not in sections]
    assert not missing, "citations of sections docs/references.md does not have:\n" + "\n".join(missing)
