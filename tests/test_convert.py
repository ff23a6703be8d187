"""OLoRA/PiSSA -> LoRA conversion from adapter files: bit-equal to PEFT's conversion where PEFT works, loadable
and exact (fp32) where PEFT fails, and nothing written on any error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from helpers import quantized_tiny_llama, tiny_gpt2, tiny_llama
from olora_core.convert import ConversionReport, convert
from olora_core.olora_init import apply_olora
from olora_core.errors import (AdapterFormatError, AdapterMismatchError, NonFiniteError, NothingToConvertError,
                               OutputExistsError, RankError, UnsupportedInitError, UnsupportedLayerError)
from tolerances import SAME_MODEL_LOGITS

pytestmark = pytest.mark.numeric  # .ci/run repeats these under ATEN_CPU_CAPABILITY=default

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
QV = ["q_proj", "v_proj"]
PERTURB = 2.0  # relative size of the random update given to A/B on quantized bases (logit effect ~1)
VARIANTS = {
    "plain": dict(r=8, lora_alpha=16, target_modules=QV),
    "patterns": dict(r=8, lora_alpha=16, target_modules=QV + ["down_proj"],
                     rank_pattern={"model.layers.0.self_attn.q_proj": 4, "down_proj": 12},
                     alpha_pattern={"v_proj": 5, "model.layers.1.self_attn.q_proj": 40}),
    "rslora": dict(r=8, lora_alpha=16, target_modules=QV, use_rslora=True),
    "pissa": dict(r=8, lora_alpha=16, target_modules=QV, init_lora_weights="pissa"),
    "modules_to_save": dict(r=8, lora_alpha=16, target_modules=QV, modules_to_save=["lm_head"]),
    "rslora_patterns": dict(r=8, lora_alpha=16, target_modules=QV + ["k_proj"], use_rslora=True,
                            rank_pattern={"k_proj": 4}, alpha_pattern={"model.layers.1.self_attn.q_proj": 7}),
}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def train_a_little(peft_model, steps: int = 3) -> None:
    """A few Adam steps on random tokens so that A != A0, B != B0 (and modules_to_save change)."""
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(0, 256, (4, 16), generator=gen)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def build_olora_pair(root: Path, init_lora_weights="olora", base_factory=tiny_llama, perturb=False, **lora):
    """Plain PEFT: init, save initial, train (or perturb), save trained. Returns the PeftModel."""
    config = LoraConfig(init_lora_weights=init_lora_weights, task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(base_factory(), config)
    peft_model.save_pretrained(root / "initial")
    if perturb:  # quantized bases: perturb instead of backprop through bitsandbytes
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if ".lora_" in name:
                    p.add_(PERTURB * p.abs().mean() * torch.randn(p.shape, generator=gen))
    else:
        train_a_little(peft_model)
    peft_model.save_pretrained(root / "trained")
    return peft_model


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def assert_equal_tensors(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_peft_and_reproduces_trained_model(tmp_path, variant):
    kwargs = dict(VARIANTS[variant])
    peft_model = build_olora_pair(tmp_path, **kwargs)
    trained_logits = logits(peft_model)
    effect = (trained_logits - logits(tiny_llama())).abs().max().item()
    print(f"{variant}: adapter effect {effect:.3f}")
    assert effect > 0.05, f"training barely changed the model ({effect})"

    report = convert(tmp_path / "initial", tmp_path / "trained", tmp_path / "ours")
    assert isinstance(report, ConversionReport)
    assert (report.kind, report.r_in, report.r_out) == ("pissa" if variant == "pissa" else "olora", 8, 16)
    assert report.n_layers == 2 * len(kwargs["target_modules"])
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert report.modules_to_save == (["base_model.model.lm_head.weight"] if variant == "modules_to_save" else [])

    # PEFT's own conversion (it rewrites initial/adapter_config.json)
    if variant == "rslora_patterns":
        with pytest.raises(ValueError, match="rank_pattern"):
            peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(
                tmp_path / "initial"))
    else:
        peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(
            tmp_path / "initial"))
        ref = load_file(tmp_path / "peft" / "adapter_model.safetensors")
        ref_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        if variant == "modules_to_save":  # PEFT drops the trained head and then cannot load its own output
            assert ref.keys() == ours.keys() - set(report.modules_to_save)
            ours_lora = {k: v for k, v in ours.items() if k not in report.modules_to_save}
            assert_equal_tensors(ours_lora, ref)
            with pytest.raises(KeyError):
                PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
        else:
            assert_equal_tensors(ours, ref)
        # target_modules is a set inside PEFT: its saved order follows the process's hash seed
        for config in (ours_config, ref_config):
            if isinstance(config.get("target_modules"), list):
                config["target_modules"] = sorted(config["target_modules"])
        assert ours_config == ref_config
    # PEFT rewrote the initial config (even when it then refused): it no longer says olora/pissa
    assert json.loads((tmp_path / "initial" / "adapter_config.json").read_text())["init_lora_weights"] is True

    # a directory PEFT has touched still converts, to the same bytes
    convert(tmp_path / "initial", tmp_path / "trained", tmp_path / "ours_touched")
    assert_equal_tensors(load_file(tmp_path / "ours_touched" / "adapter_model.safetensors"), ours)

    # plain LoRA on the ORIGINAL base reproduces the trained OLoRA model
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    err = (logits(loaded) - trained_logits).abs().max().item()
    print(f"{variant}: converted LoRA on the original base vs trained OLoRA: max logit error {err:.2e}")
    assert err <= SAME_MODEL_LOGITS, f"converted adapter differs from the trained model by {err} (effect {effect})"
    trained_layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    for name, layer in loaded.named_modules():
        if isinstance(layer, LoraLayer):
            ref_layer = trained_layers[name]
            assert layer.r["default"] == 2 * ref_layer.r["default"]
            s, s_ref = layer.scaling["default"], ref_layer.scaling["default"]
            assert abs(s - s_ref) <= 1e-12 * s_ref, (name, s, s_ref)  # per-layer scaling survives doubling


def test_gpt2_conv1d_pipeline_with_our_init(tmp_path):
    """Our OLoRA init on GPT-2 Conv1D layers (PEFT's is wrong there), PEFT training/saving, our conversion:
    the plain LoRA on the original GPT-2 reproduces the trained model."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
                        init_lora_weights="olora", task_type="CAUSAL_LM")
    peft_model = apply_olora(tiny_gpt2(), config)
    peft_model.save_pretrained(tmp_path / "initial")
    train_a_little(peft_model)
    peft_model.save_pretrained(tmp_path / "trained")
    trained_logits = logits(peft_model)
    report = convert(tmp_path / "initial", tmp_path / "trained", tmp_path / "ours")
    assert report.n_layers == 8 and report.r_out == 16
    effect = (trained_logits - logits(tiny_gpt2())).abs().max().item()
    err = (logits(PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours")) - trained_logits).abs().max().item()
    assert effect > 0.05 and err <= SAME_MODEL_LOGITS, (effect, err)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pair")
    build_olora_pair(root, r=4, lora_alpha=8, target_modules=QV)
    return root


@pytest.fixture
def work(pair, tmp_path) -> Path:
    for name in ("initial", "trained"):
        shutil.copytree(pair / name, tmp_path / name)
    return tmp_path


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory: Path, fn) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def first_key(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


ERROR_CASES = {
    "plain_lora": (NothingToConvertError, "already a plain LoRA",
                   lambda w: [edit_config(w / d, init_lora_weights=True) for d in ("initial", "trained")]),
    "r": (AdapterMismatchError, "r differs", lambda w: edit_config(w / "trained", r=8)),
    "lora_alpha": (AdapterMismatchError, "lora_alpha differs", lambda w: edit_config(w / "initial", lora_alpha=4)),
    "target_modules": (AdapterMismatchError, "target_modules differs",
                       lambda w: edit_config(w / "trained", target_modules=["q_proj", "k_proj"])),
    "base_model": (AdapterMismatchError, "base_model_name_or_path differs",
                   lambda w: edit_config(w / "trained", base_model_name_or_path="other/model")),
    "keys": (AdapterMismatchError, "tensor keys differ",
             lambda w: edit_tensors(w / "initial", lambda t: t.pop(first_key(t, "v_proj.lora_A")))),
    "shapes": (AdapterMismatchError, r"shape \(4, 64\) in initial",
               lambda w: edit_tensors(w / "trained", lambda t: t.update(
                   {first_key(t, "q_proj.lora_A"): torch.zeros(4, 32)}))),
    "nan": (NonFiniteError, "q_proj.lora_B.weight.*NaN",
            lambda w: edit_tensors(w / "trained", lambda t: t[first_key(t, "q_proj.lora_B")].__setitem__(
                (0, 0), float("nan")))),
    "missing_config": (AdapterFormatError, "missing adapter_config.json",
                       lambda w: (w / "initial" / "adapter_config.json").unlink()),
    "missing_dir": (AdapterFormatError, "not a directory", lambda w: shutil.rmtree(w / "trained")),
    "auto_mapping": (AdapterFormatError, "auto_mapping",
                     lambda w: edit_config(w / "trained", auto_mapping={"base_model_class": "X", "parent_library": "y"})),
    "dora": (UnsupportedLayerError, "use_dora",
             lambda w: [edit_config(w / d, use_dora=True) for d in ("initial", "trained")]),
    "loftq": (UnsupportedInitError, "loftq",
              lambda w: [edit_config(w / d, init_lora_weights="loftq") for d in ("initial", "trained")]),
    "olora_vs_pissa": (AdapterMismatchError, "disagree on init_lora_weights",
                       lambda w: edit_config(w / "initial", init_lora_weights="pissa")),
    "already_converted": (AdapterMismatchError, "already a converted adapter",
                          lambda w: edit_config(w / "trained", r=8, init_lora_weights=True)),
    "rank_vs_config": (RankError, "lora_A has 4 rows but the config gives this layer r=2",
                       lambda w: [edit_config(w / d, rank_pattern={"q_proj": 2}) for d in ("initial", "trained")]),
    "bad_pattern": (AdapterFormatError, "not a linear-time regular expression",
                    lambda w: [edit_config(w / d, rank_pattern={"q_proj(": 2}) for d in ("initial", "trained")]),
    "unpaired": (AdapterMismatchError, "has no matching",
                 lambda w: [edit_tensors(w / d, lambda t: t.pop(first_key(t, "v_proj.lora_B")))
                            for d in ("initial", "trained")]),
    "embedding": (UnsupportedLayerError, "lora_embedding_A",
                  lambda w: [edit_tensors(w / d, lambda t: t.update(
                      {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 256)}))
                      for d in ("initial", "trained")]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_write_nothing(work, case):
    error, message, breaks = ERROR_CASES[case]
    breaks(work)
    before = listing(work)
    with pytest.raises(error, match=message):
        convert(work / "initial", work / "trained", work / "out")
    assert listing(work) == before  # no output dir, no temp dir left behind


def test_swapped_directories_are_refused(work):
    before = listing(work)
    with pytest.raises(AdapterMismatchError, match="not an OLoRA init.*swapped"):
        convert(work / "trained", work / "initial", work / "out")
    assert listing(work) == before


def test_pickle_weights_are_refused_unopened(work):
    marker = work / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (work / "trained" / "adapter_model.safetensors").unlink()
    (work / "trained" / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    before = listing(work)
    with pytest.raises(AdapterFormatError, match=r"pickle files \(adapter_model.bin\)"):
        convert(work / "initial", work / "trained", work / "out")
    assert not marker.exists() and listing(work) == before


def test_existing_output_is_kept_unless_overwrite(work):
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        convert(work / "initial", work / "trained", out)
    assert listing(out) == ["keep.txt"]
    with pytest.raises(OutputExistsError, match="must not replace"):
        convert(work / "initial", work / "trained", work / "trained", overwrite=True)
    convert(work / "initial", work / "trained", out, overwrite=True)
    assert listing(out) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_conversion_error(tmp_path, bits):
    """The trained model ran on Q(W - s·B0·A0); the converted adapter runs on Q(W): not exact."""
    def base_factory():
        return quantized_tiny_llama(tmp_path / "base", bits)

    peft_model = build_olora_pair(tmp_path, base_factory=base_factory, perturb=True, r=8, lora_alpha=16,
                                  target_modules=QV)
    trained_logits = logits(peft_model)
    base_logits = logits(base_factory())
    init_gap = (logits(get_peft_model(base_factory(), LoraConfig(
        r=8, lora_alpha=16, target_modules=QV, init_lora_weights="olora"))) - base_logits).abs().max().item()
    convert(tmp_path / "initial", tmp_path / "trained", tmp_path / "ours")
    converted_logits = logits(PeftModel.from_pretrained(base_factory(), tmp_path / "ours"))
    effect = (trained_logits - base_logits).abs().max().item()
    err = (converted_logits - trained_logits).abs().max().item()
    print(f"{'nf4' if bits == 4 else 'int8'} base: converted vs trained max logit error {err:.4f}, "
          f"adapter effect {effect:.4f} (ratio {err / effect:.3f}); output change at init {init_gap:.4f}")
    assert effect > 0.5 and err < 0.1 * effect
    assert err < 2 * init_gap  # the conversion adds nothing beyond the residual's own quantization gap
