"""docs/models.md shows the family table of the test matrix (tests/model_families.py): every tested family, with
its served/refused status and, for a refused one, the reason its start error gives."""
from __future__ import annotations

import re
from pathlib import Path

from model_families import FAMILIES

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def table_rows() -> dict[str, tuple[str, str]]:
    """model_type tested -> (status, notes), from the rows `| Family | `name` | status | notes |`."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\|[^|]+\| `([^`]+)` \| (served|refused) \|(.*)\|$", line)
        if match:
            rows[match[1]] = (match[2], match[3].strip())
    return rows


def test_models_doc_matches_the_matrix():
    rows = table_rows()
    assert set(rows) == {f.name for f in FAMILIES}
    for family in FAMILIES:
        status, notes = rows[family.name]
        assert status == ("served" if family.served else "refused"), family.name
        if not family.served:  # the doc's reason is the one the refusal names (e.g. "ALiBi")
            assert family.refusal.split(": ", 1)[1] in notes, family.name
