"""README.md and docs/: CI's test command is where .ci/run reads it, every docs page is linked
from the README, relative links and their anchors resolve, and every bench/results file the
text cites is committed."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# File names the text mentions that are not results: a checkpoint's config, a CLI example's
# output, the Triton launch configs (rocm_moe/experts/).
NOT_RESULTS = {"config.json", "out.json", "triton_configs.json"}


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no '# comments' in code
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_ci_test_command_follows_the_marker():
    """.ci/run runs the first fenced block after '<!-- test-command -->' in README.md."""
    text = (ROOT / "README.md").read_text()
    assert "<!-- test-command -->" in text, "README.md lost the marker .ci/run looks for"
    block = re.search(r"<!-- test-command -->\s*```\w*\n(.*?)```", text, flags=re.S)
    assert block, "no fenced block after <!-- test-command -->"
    cmd = block.group(1)
    for part in ("python -m pytest", "ruff check", "nox -s vllm sglang"):
        assert part in cmd, part
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in readme]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, f"{page.name}: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cited_results_are_committed(page):
    missing = []
    for name in re.findall(r"[\w./*-]+\.(?:txt|json|png)\b", page.read_text()):
        if name.startswith(".") or name in NOT_RESULTS:
            continue  # '..._cap4096_h100.txt' abbreviates the file named just before it
        found = [*ROOT.glob(name), *(ROOT / "bench" / "results").glob(Path(name).name)]
        if not found:
            missing.append(name)
    assert not missing, f"{page.name} cites files that are not committed: {missing}"
