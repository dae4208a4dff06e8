"""README is the front door and docs/ holds the rest: every relative link in them resolves, README stays small.

    pytest tests/test_docs.py -q
"""
import re

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    links = [u for u in LINK.findall(page.read_text()) if not re.match(r"[a-z]+://|mailto:|#", u)]
    missing = [u for u in links if not (page.parent / u.split("#", 1)[0]).exists()]
    assert not missing, f"{page.name}: {missing}"


def test_readme_is_a_front_door_that_links_every_docs_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, f"README does not link {page.name}"
