"""The README stays a user's page: short, and a way into every internals page under docs/."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_is_short_and_links_every_docs_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.encode()) <= 15 * 1024, f"README.md is {len(readme.encode())} bytes; move internals to docs/"
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    pages = {f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
    missing = [p for p in linked if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"README links pages that do not exist: {missing}"
