"""The README's Python snippets run as written (they are the first code a newcomer copies)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# The adapter snippet is a line inside someone else's model (it names their variables): the
# adapters' own tests run that call pattern (tests/test_adapters.py).
RUNNABLE = [snippet for snippet in SNIPPETS if "self." not in snippet]


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250, "depth belongs in docs/"


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[f"snippet{i}" for i in range(len(RUNNABLE))])
def test_readme_snippet_runs(snippet):
    exec(compile(snippet, str(README), "exec"), {})


def test_every_docs_link_resolves():
    for target in re.findall(r"\]\((docs/[^)#]+)", README.read_text()):
        assert (README.parent / target).exists(), target
