"""olora_core.train and olora_core.data on a tiny Llama + byte-level tokenizer built in code."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from helpers import tiny_llama
from olora_core.data import IGNORE_INDEX, DataError, SeededBatches, load_dataset
from olora_core.errors import OLoRAError
from olora_core.train import TrainConfig, TrainError, train
from tolerances import SAME_MODEL_LOGITS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, plus <eos> and <pad>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def build_tiny_base(path: Path) -> Path:
    """Save a tiny random Llama and its byte tokenizer as a Hugging Face model directory."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(seed=0, vocab=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def shout_data(tmp_path_factory) -> Path:
    rows = [json.loads(line) for line in (EXAMPLES / "shout.jsonl").read_text().splitlines()[:48]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "shout48.jsonl", rows)


def tiny_config(base: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(base=base, data=data, out=out, r=4, alpha=8.0, steps=16, lr=1e-2, batch_size=4,
                    seq_len=128, seed=7, threads=1, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def olora_runs(tiny_base, shout_data, tmp_path_factory):
    """The same OLoRA config trained twice into two directories."""
    root = tmp_path_factory.mktemp("runs")
    first = train(tiny_config(tiny_base, shout_data, root / "a"))
    second = train(tiny_config(tiny_base, shout_data, root / "b"))
    return first, second


def adapter_files(out: Path) -> list[Path]:
    return sorted(out.glob("*/adapter_model.safetensors"))


# ---------------------------------------------------------------- training runs


def test_run_writes_initial_trained_converted_and_report(olora_runs):
    report = olora_runs[0]
    out = Path(report.out_dir)
    for name in ("initial", "trained", "converted"):
        assert (out / name / "adapter_config.json").is_file(), name
        assert (out / name / "adapter_model.safetensors").is_file(), name
    assert not list(out.glob("*/*.bin"))  # safetensors only
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["losses"] == report.losses and len(report.losses) == 16
    assert saved["config"]["init"] == "olora" and saved["config"]["r"] == 4
    assert {"load_s", "train_s", "convert_s", "total_s"} <= set(saved["timings_s"])
    assert saved["converted_dir"] == str(out / "converted")
    assert json.loads((out / "initial" / "adapter_config.json").read_text())["init_lora_weights"] == "olora"
    assert not list(out.parent.glob(".*tmp-*"))  # no staging leftovers


def test_initial_adapter_is_saved_before_training(olora_runs):
    out = Path(olora_runs[0].out_dir)
    initial = load_file(out / "initial" / "adapter_model.safetensors")
    trained = load_file(out / "trained" / "adapter_model.safetensors")
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[key], trained[key]) for key in initial)


def test_same_seed_gives_bitwise_equal_adapters(olora_runs):
    first, second = (Path(report.out_dir) for report in olora_runs)
    assert olora_runs[0].losses == olora_runs[1].losses
    for path in adapter_files(first):
        tensors_a = load_file(path)
        tensors_b = load_file(second / path.relative_to(first))
        assert tensors_a.keys() == tensors_b.keys()
        for key in tensors_a:
            assert torch.equal(tensors_a[key], tensors_b[key]), f"{path.parent.name}: {key}"


def test_other_seed_gives_other_adapter(tiny_base, shout_data, tmp_path, olora_runs):
    other = train(tiny_config(tiny_base, shout_data, tmp_path / "c", seed=8, steps=2))
    a = load_file(Path(olora_runs[0].out_dir) / "trained" / "adapter_model.safetensors")
    b = load_file(Path(other.out_dir) / "trained" / "adapter_model.safetensors")
    assert any(not torch.equal(a[key], b[key]) for key in a)


def test_loss_decreases(olora_runs):
    losses = olora_runs[0].losses
    assert all(math.isfinite(loss) for loss in losses)
    # A random tiny model starts near log(vocab); q/v adapters move it slowly but steadily.
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses
    assert min(losses) < losses[0] - 0.15, losses


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits  # (B, T, V)


def _trained_reference_logits(base: Path, out: Path, input_ids: torch.Tensor, scaling: float) -> torch.Tensor:
    """The trained OLoRA model by hand: W - s*B0@A0 + s*B@A on every adapted module (no PEFT)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    initial = load_file(out / "initial" / "adapter_model.safetensors")
    trained = load_file(out / "trained" / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    a_keys = [key for key in trained if key.endswith(".lora_A.weight")]
    assert a_keys
    with torch.no_grad():
        for a_key in a_keys:
            b_key = a_key.replace(".lora_A.", ".lora_B.")
            name = a_key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            weight = modules[name].weight  # (out, in)
            weight -= scaling * initial[b_key] @ initial[a_key]  # (out, r) @ (r, in)
            weight += scaling * trained[b_key] @ trained[a_key]
    return _logits(model, input_ids)


@pytest.mark.parametrize("init, rslora", [("olora", False), ("pissa", False), ("olora", True)])
def test_converted_adapter_on_original_base_matches_trained_model(tiny_base, shout_data, tmp_path, init, rslora):
    from peft import PeftModel

    report = train(tiny_config(tiny_base, shout_data, tmp_path / "run", init=init, use_rslora=rslora))
    out = Path(report.out_dir)
    scaling = 8.0 / (math.sqrt(4) if rslora else 4)
    input_ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))  # (B, T)

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    base_logits = _logits(base, input_ids)
    converted = PeftModel.from_pretrained(base, out / "converted").eval()
    converted_logits = _logits(converted, input_ids)

    reference = _trained_reference_logits(tiny_base, out, input_ids, scaling)
    # PEFT reloading the unconverted adapter re-runs the init on a fresh base: the same model.
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), out / "trained").eval()
    assert (_logits(reloaded, input_ids) - reference).abs().max() <= SAME_MODEL_LOGITS

    assert (converted_logits - base_logits).abs().max() > 1e-2  # the adapter does something
    assert (converted_logits - reference).abs().max() <= SAME_MODEL_LOGITS
    converted_config = json.loads((out / "converted" / "adapter_config.json").read_text())
    assert converted_config["r"] == 8


def test_initial_olora_adapter_keeps_the_base_output(olora_runs, tiny_base):
    from peft import PeftModel

    input_ids = torch.arange(40).reshape(2, 20)  # (B, T)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval(), input_ids)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                                      Path(olora_runs[0].out_dir) / "initial").eval()
    assert (_logits(model, input_ids) - base_logits).abs().max() <= SAME_MODEL_LOGITS


def test_plain_lora_is_not_converted(tiny_base, shout_data, tmp_path):
    # also: the output's missing parents are created, as `olora train --out runs/NAME` needs on a fresh clone
    report = train(tiny_config(tiny_base, shout_data, tmp_path / "runs" / "lora", init="lora", steps=3))
    out = Path(report.out_dir)
    assert report.converted_dir is None and not (out / "converted").exists()
    assert "nothing to convert" in report.conversion_note
    assert json.loads((out / "train_report.json").read_text())["conversion_note"] == report.conversion_note
    assert (out / "trained" / "adapter_model.safetensors").is_file()


def test_all_linear_targets(tiny_base, shout_data, tmp_path):
    report = train(tiny_config(tiny_base, shout_data, tmp_path / "all", targets="all-linear", steps=1))
    keys = load_file(Path(report.out_dir) / "trained" / "adapter_model.safetensors").keys()
    adapted = {key.split(".")[-3] for key in keys}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---------------------------------------------------------------- output directory and config errors


def test_existing_output_needs_overwrite(olora_runs, tiny_base, shout_data):
    out = Path(olora_runs[0].out_dir)
    before = (out / "train_report.json").read_text()
    with pytest.raises(TrainError, match="not empty.*--overwrite"):
        train(tiny_config(tiny_base, shout_data, out, steps=1))
    assert (out / "train_report.json").read_text() == before


def test_overwrite_replaces_previous_output(tiny_base, shout_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_base, shout_data, out, steps=1, init="lora"))
    report = train(tiny_config(tiny_base, shout_data, out, steps=2, init="lora", overwrite=True))
    assert len(json.loads((out / "train_report.json").read_text())["losses"]) == 2 == len(report.losses)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_overwrite_refuses_a_foreign_directory(tiny_base, shout_data, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="refusing to overwrite"):
        train(tiny_config(tiny_base, shout_data, tmp_path, overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_errors_leave_nothing_behind(tiny_base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 2"):
        train(tiny_config(tiny_base, bad, tmp_path / "out"))
    with pytest.raises(TrainError, match="config.json"):
        train(tiny_config(tmp_path / "no_model", bad, tmp_path / "out"))
    with pytest.raises(TrainError, match="rank r=128 does not fit"):
        train(tiny_config(tiny_base, EXAMPLES / "shout.jsonl", tmp_path / "out", r=128))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.parametrize("field, value, message", [
    ("init", "loftq", "init must be one of"), ("steps", 0, "steps must be at least 1"),
    ("targets", "everything", "all-linear"), ("targets", (), "targets is empty"), ("lr", -1.0, "lr must be"),
])
def test_bad_config_is_rejected(tmp_path, field, value, message):
    with pytest.raises(TrainError, match=message):
        train(TrainConfig(base=tmp_path, data=tmp_path / "d.txt", out=tmp_path / "o", **{field: value}))
    assert issubclass(TrainError, OLoRAError) and issubclass(TrainError, ValueError)


# ---------------------------------------------------------------- data loading


def test_prompt_completion_labels_only_the_completion(tmp_path):
    tokenizer = byte_tokenizer()
    data = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "ab:", "completion": " XY"}])
    dataset = load_dataset(data, tokenizer, seq_len=64)
    (example,) = dataset.examples
    prompt_ids = tokenizer("ab:")["input_ids"]
    completion_ids = tokenizer(" XY", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert list(example.input_ids) == prompt_ids + completion_ids
    assert list(example.labels) == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert dataset.kind == "jsonl-prompt-completion" and dataset.loss_tokens == len(completion_ids)


def test_text_file_is_cut_into_seq_len_chunks(tmp_path):
    tokenizer = byte_tokenizer()
    data = tmp_path / "corpus.txt"
    data.write_text("0123456789" * 5)  # 50 byte tokens
    dataset = load_dataset(data, tokenizer, seq_len=16)
    assert [len(example.input_ids) for example in dataset.examples] == [16, 16, 16, 2]
    assert all(example.labels == example.input_ids for example in dataset.examples)


def test_text_file_drops_a_last_chunk_of_one_token(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("x" * 17)  # the 17th token would have nothing to predict
    assert [len(ex.input_ids) for ex in load_dataset(data, byte_tokenizer(), 16).examples] == [16]


def test_jsonl_text_records_get_eos_and_full_loss(tmp_path):
    tokenizer = byte_tokenizer()
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "abcdefghij"}])
    dataset = load_dataset(data, tokenizer, seq_len=8)
    assert [len(ex.input_ids) for ex in dataset.examples] == [6, 8, 3]
    assert dataset.examples[0].input_ids[-1] == tokenizer.eos_token_id
    assert dataset.kind == "jsonl-text"


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n\n{"prompt": "x"\n', r"bad JSON in .*line 3"),
    ('["a list"]\n', "expected a JSON object"),
    ('{"input": "x"}\n', "expected a 'text' key"),
    ('{"prompt": "x"}\n', "missing key 'completion'"),
    ('{"prompt": "x", "completion": 3}\n', "'completion' must be a string"),
    ("\n\n", "empty"),
])
def test_bad_jsonl_is_reported_with_its_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(path, byte_tokenizer(), 32)


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl", byte_tokenizer(), 32)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "empty.txt", byte_tokenizer(), 32)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_dataset(tmp_path / "data.csv", byte_tokenizer(), 32)


def test_completion_beyond_seq_len_is_dropped_and_explained(tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 40, "completion": "c"}])
    with pytest.raises(DataError, match="no completion token left within seq_len=16"):
        load_dataset(data, byte_tokenizer(), 16)


def test_batches_follow_the_seed_and_cover_each_epoch(tmp_path):
    rows = [{"text": f"example {index}"} for index in range(10)]
    dataset = load_dataset(write_jsonl(tmp_path / "t.jsonl", rows), byte_tokenizer(), 32)

    def first_epoch(seed: int) -> list[tuple[int, ...]]:
        batches = SeededBatches(dataset.examples, batch_size=5, seed=seed, pad_token_id=0)
        rows_seen = []
        for _ in range(2):
            batch = batches.next_batch()
            assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                rows_seen.append(tuple(ids[mask.bool()].tolist()))
        return rows_seen

    assert first_epoch(1) == first_epoch(1) != first_epoch(2)
    assert sorted(first_epoch(1)) == sorted(ex.input_ids for ex in dataset.examples)
