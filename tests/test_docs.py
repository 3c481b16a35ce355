"""The docs: docs/robustness.md names existing tests; every relative link in README.md and
docs/*.md resolves (file and #anchor); every docs page is linked from the README."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"(test_\w+\.py)::(test_\w+)")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_every_robustness_row_names_existing_tests():
    rows = [line for line in (ROOT / "docs" / "robustness.md").read_text().splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    headers = [row for row in rows if row.split("|")[-2].strip() == "test"]
    body = [row for row in rows if row not in headers]
    assert len(headers) >= 6 and len(body) > 50
    for row in body:
        references = REFERENCE.findall(row.split("|")[-2])
        assert references, row
        for file, test in references:
            assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), (file, test)


def prose(text: str) -> list[str]:
    """The lines of a Markdown page outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    for line in prose(page.read_text()):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            if n:
                seen[f"{slug}-{n}"] = 1
    return set(seen)


def links(page: Path) -> list[str]:
    return [target for line in prose(page.read_text()) for target in LINK.findall(line)
            if not re.match(r"^[a-z]+:", target)]  # http(s), mailto: not checked here


def test_every_relative_link_resolves():
    checked = 0
    for page in PAGES:
        for target in links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)}: {target} (no such file)"
            if anchor:
                assert file.suffix == ".md", f"{page.relative_to(ROOT)}: {target} (anchor into a non-page)"
                assert anchor in anchors(file), f"{page.relative_to(ROOT)}: {target} (no such heading)"
            checked += 1
    assert checked > 20


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"README.md does not link {page.relative_to(ROOT)}"
