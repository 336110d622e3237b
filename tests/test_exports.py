"""The public API is exactly what docs/api.md lists (STYLE.md item 11)."""

import re
from pathlib import Path

import tether

API = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_all_matches_docs_api_table():
    documented = re.findall(r"^\| `([A-Za-z_]+)` \|", API.read_text(), flags=re.M)
    assert sorted(documented) == sorted(tether.__all__)


def test_every_export_exists_and_has_a_docstring():
    for name in tether.__all__:
        obj = getattr(tether, name)
        if name != "Handler":  # a type alias
            assert (obj.__doc__ or "").strip(), name


def test_package_is_typed():
    assert (Path(tether.__file__).parent / "py.typed").exists()
