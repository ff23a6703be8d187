"""The README documents every setting and every endpoint (a guard against drift)."""
from pathlib import Path

from app.server.main import create_app
from app.server.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented():
    missing = [f"OLORA_{name.upper()}" for name in Settings.model_fields if f"OLORA_{name.upper()}" not in README]
    assert not missing


def test_every_endpoint_has_a_curl_example():
    app = create_app(Settings(demo_adapters=False))
    paths = set(app.openapi()["paths"])
    assert "/generate" in paths and "/adapters/{adapter_id}/merge-into-base" in paths
    curl_lines = "\n".join(line for line in README.splitlines() if "curl" in line or "localhost" in line)
    missing = []
    for path in paths:
        head, _, rest = path.partition("{")  # any path parameter: {adapter_id}, {model_id}, ...
        tail = rest.partition("}")[2]
        if not any(head.rstrip("/") in line and tail in line for line in curl_lines.splitlines()):
            missing.append(path)
    assert not missing, missing


def test_readme_has_the_two_setup_commands():
    assert "make serve" in README and "make test" in README
