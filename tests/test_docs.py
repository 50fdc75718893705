"""The README is one page and the manual is docs/: every link between them lands somewhere."""

import re
from pathlib import Path

import pytest

from tasks import paths

PAGES = [paths.README, *sorted(paths.DOCS.glob("*.md"))]
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_INDENTED = re.compile(r"^(?: {4}|\t).*$", re.M)  # an indented code block's lines
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without code and comments, where a bracket is not a link."""
    for pattern in (_FENCE, _COMMENT, _INDENTED, _CODE_SPAN):
        text = pattern.sub("", text)
    return text


def links(page: Path) -> list[str]:
    return _LINK.findall(prose(page.read_text()))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but hyphens dropped, spaces to
    hyphens (letters, digits and underscores stay)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on a page; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slugs_follow_githubs_rules():
    assert slug("Object storage") == "object-storage"
    assert slug("GPU hosts (Docker)") == "gpu-hosts-docker"
    assert slug("With `triton/send_request.py`") == "with-tritonsend_requestpy"
    assert slug("This machine and TensorRT") == "this-machine-and-tensorrt"


def test_a_link_in_code_is_not_a_link():
    assert _LINK.findall(prose("see [a](b.md), not `[c](d.md)`\n\n    [e](f.md)\n")) == ["b.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(paths.ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.is_file():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_links_every_page_of_the_manual():
    linked = {(paths.ROOT / t.partition("#")[0]).resolve() for t in links(paths.README)}
    missing = [p.name for p in paths.DOCS.glob("*.md") if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{', docs/'.join(missing)}"


def test_the_readme_stays_a_page():
    assert len(paths.README.read_text().splitlines()) <= 180, "move the detail to docs/"
