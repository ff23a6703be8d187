"""The `olora` command line, run in-process through `main([...])` (plus one real subprocess call)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from olora_core.cli import greedy_generate, main
from test_train import EXAMPLES, build_tiny_base

SUBCOMMANDS = ("default-model", "convert", "train", "generate")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("cli_tiny_base"))


@pytest.fixture(scope="module")
def tiny_run(tiny_base, tmp_path_factory) -> Path:
    """`olora train` on the tiny base: a real initial/ + trained/ pair for the convert tests."""
    out = tmp_path_factory.mktemp("cli_runs") / "run"
    code = main(["train", "--base", str(tiny_base), "--data", str(EXAMPLES / "shout.jsonl"), "--out", str(out),
                 "--steps", "3", "--r", "4", "--batch-size", "2", "--threads", "1", "--quiet"])
    assert code == 0
    return out


# ---------------------------------------------------------------- help


def test_top_level_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in (*SUBCOMMANDS, "serve"):
        assert name in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: olora {command}")
    assert len(out.splitlines()) > 4


def test_train_help_documents_the_outputs_and_defaults(capsys):
    main(["train", "--help"])
    out = capsys.readouterr().out
    for text in ("OUT/initial", "OUT/converted", "train_report.json", "--rslora", "(default: 8)", "q_proj,v_proj"):
        assert text in out


def test_serve_passes_its_arguments_to_the_server(capsys, monkeypatch):
    """The installed server answers `olora serve --help` with its own help; without the server's entry point
    (olora_core alone): a clear message and exit 2."""
    assert main(["serve", "--help"]) == 0
    assert "usage: olora serve" in capsys.readouterr().out
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    assert main(["serve", "--help"]) == 2
    assert "the server is not installed in this build" in capsys.readouterr().err


def test_serve_hands_over_the_rest_of_argv(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("app.server.cli_serve")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "app.server.cli_serve", fake)
    import app

    monkeypatch.setattr(app, "cli_serve", fake, raising=False)
    assert main(["serve", "--port", "9000", "--help"]) == 0
    assert seen == [["--port", "9000", "--help"]]


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["convert", "--initial", "x"]) == 2
    assert main(["train", "--data", "x", "--out", "y", "--init", "loftq"]) == 2
    assert "usage:" in capsys.readouterr().err


# ---------------------------------------------------------------- default-model


def test_default_model_prints_a_model_directory(capsys):
    assert main(["default-model"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.is_absolute() and path.is_dir()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


# ---------------------------------------------------------------- convert


def test_convert_writes_the_adapter_and_a_summary(tiny_run, tmp_path, capsys):
    out = tmp_path / "lora"
    code = main(["convert", "--initial", str(tiny_run / "initial"), "--trained", str(tiny_run / "trained"),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"converted adapter written to {out}" in captured.out
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    # the same output as the one `olora train` wrote
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (tiny_run / "converted" / "adapter_model.safetensors").read_bytes()


def _assert_error_and_nothing_written(code: int, capsys, out: Path) -> str:
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and len(captured.err.strip()) > len("error: ") + 10
    assert captured.out == ""
    assert not out.exists()
    return captured.err


def test_convert_missing_initial_dir(tiny_run, tmp_path, capsys):
    out = tmp_path / "lora"
    code = main(["convert", "--initial", str(tmp_path / "nope"), "--trained", str(tiny_run / "trained"),
                 "--out", str(out)])
    assert "nope" in _assert_error_and_nothing_written(code, capsys, out)


def test_convert_of_a_plain_lora_adapter(tiny_base, tmp_path, capsys):
    run = tmp_path / "lora_run"
    assert main(["train", "--base", str(tiny_base), "--data", str(EXAMPLES / "shout.jsonl"), "--out", str(run),
                 "--steps", "1", "--r", "4", "--init", "lora", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "converted"
    code = main(["convert", "--initial", str(run / "initial"), "--trained", str(run / "trained"), "--out", str(out)])
    _assert_error_and_nothing_written(code, capsys, out)


def test_convert_swapped_or_mismatched_dirs(tiny_run, tiny_base, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--base", str(tiny_base), "--data", str(EXAMPLES / "shout.jsonl"), "--out", str(other),
                 "--steps", "1", "--r", "2", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "converted"
    code = main(["convert", "--initial", str(other / "initial"), "--trained", str(tiny_run / "trained"),
                 "--out", str(out)])
    _assert_error_and_nothing_written(code, capsys, out)


def test_convert_refuses_an_existing_output_without_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "lora"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["convert", "--initial", str(tiny_run / "initial"), "--trained", str(tiny_run / "trained"),
            "--out", str(out)]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_installed_olora_script_reports_errors_with_exit_2(tmp_path):
    script = Path(sys.executable).parent / "olora"
    assert script.is_file(), "the console script is installed with the package (pip install -e .)"
    result = subprocess.run([str(script), "convert", "--initial", str(tmp_path / "a"), "--trained",
                             str(tmp_path / "b"), "--out", str(tmp_path / "c")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- train and generate


def test_train_writes_the_report(tiny_run):
    report = json.loads((tiny_run / "train_report.json").read_text())
    assert len(report["losses"]) == 3 and report["config"]["r"] == 4
    assert report["config"]["targets"] == ["q_proj", "v_proj"]
    assert (tiny_run / "converted" / "adapter_model.safetensors").is_file()


def test_train_summary_output(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--base", str(tiny_base), "--data", str(EXAMPLES / "pirate.jsonl"), "--out", str(out),
                 "--steps", "2", "--r", "2", "--targets", "all-linear", "--rslora", "--threads", "1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trained 2 steps" in captured.out and str(out / "converted") in captured.out
    config = json.loads((out / "train_report.json").read_text())["config"]
    assert config["targets"] == "all-linear" and config["use_rslora"] is True


def test_train_errors_exit_2_and_leave_nothing(tiny_base, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    out = tmp_path / "out"
    code = main(["train", "--base", str(tiny_base), "--data", str(data), "--out", str(out), "--quiet"])
    assert "line 2" in _assert_error_and_nothing_written(code, capsys, out)
    code = main(["train", "--base", str(tmp_path / "no_model"), "--data", str(data), "--out", str(out)])
    assert "config.json" in _assert_error_and_nothing_written(code, capsys, out)


def test_generate_with_and_without_adapter(tiny_base, tiny_run, capsys):
    prompt = "text: Return the value.\nshout:"
    assert main(["generate", "--base", str(tiny_base), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert printed == greedy_generate(tiny_base, prompt, max_new_tokens=6) + "\n"
    assert main(["generate", "--base", str(tiny_base), "--adapter", str(tiny_run / "converted"),
                 "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_generate_with_a_missing_adapter_exits_2(tiny_base, tmp_path, capsys):
    code = main(["generate", "--base", str(tiny_base), "--adapter", str(tmp_path / "none"), "--prompt", "x"])
    assert code == 2 and "adapter_model.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------- acceptance: a real task on the default model


def _upper_fraction(text: str) -> float:
    letters = [char for char in text.strip().split("\n")[0] if char.isalpha()]
    return sum(char.isupper() for char in letters) / max(1, len(letters))


@pytest.mark.slow
def test_olora_train_on_the_default_model_visibly_changes_greedy_output(tmp_path, capsys):
    """`olora train` on examples/shout.jsonl: on held-out prompts the converted adapter answers in upper case,
    the base model does not, and the converted adapter on the original base generates exactly what the
    unconverted OLoRA adapter (PEFT re-running the init) generates."""
    from olora_core.default_model import default_model_path

    out = tmp_path / "shout"
    code = main(["train", "--data", str(EXAMPLES / "shout.jsonl"), "--out", str(out), "--steps", "80",
                 "--lr", "3e-3", "--threads", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    losses = json.loads((out / "train_report.json").read_text())["losses"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.4, losses

    base = default_model_path()
    heldout = [json.loads(line)["prompt"] for line in (EXAMPLES / "shout-heldout.jsonl").read_text().splitlines()]
    task_prompts = [prompt for prompt in heldout if prompt.endswith("\nshout:")]
    bare_prompts = [prompt for prompt in heldout if "\n" not in prompt]  # plain continuations
    for prompt in task_prompts[:2] + bare_prompts[:1]:
        before = greedy_generate(base, prompt, max_new_tokens=16)
        after = greedy_generate(base, prompt, out / "converted", max_new_tokens=16)
        unconverted = greedy_generate(base, prompt, out / "trained", max_new_tokens=16)
        assert after != before
        assert _upper_fraction(before) < 0.5, before
        assert _upper_fraction(after) > 0.75, after
        assert after == unconverted
