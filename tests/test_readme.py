"""The README's API example runs as written (docs that match the code)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_models_and_activations_docs_examples_run():
    """docs/models.md, docs/activations.md and docs/race.md: every python block runs as
    written."""
    for name in ("models.md", "activations.md", "race.md"):
        path = README.parent / "docs" / name
        blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
        assert blocks, f"{name} has no python example"
        for code in blocks:
            exec(compile(code, str(path), "exec"), {})
