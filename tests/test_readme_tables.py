"""The README's tables are the code's: the error table is app/server/errors.py's (and the errors' own
`status_code` hints are honoured by the mapping); the settings table is app/server/settings.py's fields, flags
and defaults."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.adapters.store.adapter_store import StoreError
from app.engine.errors import EngineError
from app.server import errors
from app.server.errors import BY_STATUS, ERROR_TABLE, INSTANCE_STATUS_NAMES, OS_ERRORS, classify
from app.server.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def code_kinds() -> set[tuple[int, str]]:
    kinds = list(ERROR_TABLE.values()) + list(BY_STATUS.values()) + list(INSTANCE_STATUS_NAMES.values())
    kinds += [kind for kind, _ in OS_ERRORS.values()] + [errors.NOT_FOUND, errors.INTERNAL]
    return {(k.status, k.error_type) for k in kinds}


def readme_kinds() -> set[tuple[int, str]]:
    """(status, error_type) of every row of the README's error table; a row `401 / 403 | a / b` pairs them."""
    start = README.index("| status | `error_type`")
    rows = []
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    out = set()
    for row in rows:
        status_cell, kinds_cell = [c.strip() for c in row.strip("|").split("|")[:2]]
        statuses = [int(s) for s in re.findall(r"\d{3}", status_cell)]
        groups = [re.findall(r"`([a-z_]+)`", part) for part in kinds_cell.split(" / ")]
        if len(statuses) > 1:
            assert len(groups) == len(statuses), row
            out |= {(status, kind) for status, group in zip(statuses, groups) for kind in group}
        else:
            out |= {(statuses[0], kind) for group in groups for kind in group}
    return out


def test_readme_error_table_is_the_code_table():
    documented, code = readme_kinds(), code_kinds()
    assert not code - documented, f"in app/server/errors.py, missing from the README table: {sorted(code - documented)}"
    assert not documented - code, f"in the README table, not in app/server/errors.py: {sorted(documented - code)}"


def test_the_table_agrees_with_the_status_code_hints():
    for cls, kind in ERROR_TABLE.items():
        hint = vars(cls).get("status_code")
        if isinstance(hint, int):
            assert hint == kind.status, f"{cls.__name__}: status_code {hint}, table {kind.status}"


@pytest.mark.parametrize("base", [EngineError, StoreError])
def test_a_subclass_status_code_hint_is_honoured(base):
    conflict = type("Conflict", (base,), {"status_code": 409})
    kind, message = classify(conflict("the thing changed under you"))
    assert (kind.status, kind.error_type) == (409, "conflict") and message == "the thing changed under you"
    plain = type("Plain", (base,), {})  # no hint of its own: the table's row for its parent
    assert classify(plain("x"))[0] == ERROR_TABLE[base]


def test_readme_settings_table_is_the_settings_model():
    """Every row: `OLORA_<FIELD>` | `--<field-with-dashes>` | `<default>` (secrets: `(none)`); one row per field."""
    start = README.index("| environment | flag | default | meaning |")
    rows = {}
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        env, flag, default = re.findall(r"`([^`]*)`", line)[:3]
        rows[env] = (flag, default)
    expected = {}
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "(none)" if name in ("api_keys", "admin_keys") and not default else str(default)
        expected[f"OLORA_{name.upper()}"] = ("--" + name.replace("_", "-"), shown)
    assert rows == expected
