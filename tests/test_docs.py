"""The project's documents stand alone: every relative link in README.md and docs/ reaches a file
of the project, and none cites a file outside it."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _documents():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def broken_links(text: str, folder: pathlib.Path):
    """The relative link targets in markdown ``text`` (a document in ``folder``) that are no file
    or folder of the project (anchors dropped; web addresses not checked)."""
    bad = []
    for target in LINK.findall(text):
        file = target.split("#")[0]
        if not file or re.match(r"[a-z]+:", file):
            continue
        resolved = (folder / file).resolve()
        if ROOT not in resolved.parents or not resolved.exists():
            bad.append(target)
    return bad


def test_every_relative_link_in_the_documents_reaches_a_file_of_the_project():
    documents = _documents()
    assert len(documents) >= 10  # README, docs/*.md, docs/frameworks/*.md
    broken = {str(d.relative_to(ROOT)): broken_links(d.read_text(), d.parent) for d in documents}
    assert {d: links for d, links in broken.items() if links} == {}


def test_a_broken_or_outside_link_is_found():
    text = ("[ok](results.md) [anchor](method.md#13-x) [web](https://pytorch.org) "
            "[gone](results/none.md) [outside](../../shared/design/METHOD.md)")
    assert broken_links(text, ROOT / "docs") == ["results/none.md", "../../shared/design/METHOD.md"]


def test_no_document_cites_the_design_files_outside_the_project():
    outside = re.compile(r"shared/design|\b(METHOD|FRAMEWORKS|KERNELS|ARCHITECTURE)\.md\b")
    for path in [*_documents(), *sorted((ROOT / "revpass").rglob("*.py"))]:
        assert not outside.search(path.read_text()), path
