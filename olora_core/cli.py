"""The `olora` command line: default-model, convert, train, generate, serve.

Errors the library raises on bad input (`OLoRAError`) become ``error: <message>`` on stderr and
exit status 2. Heavy imports (torch, transformers, peft) happen inside the handlers, so
``olora --help`` is quick.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap
import warnings
from pathlib import Path

from olora_core.dtypes import DTYPE_NAMES, QUANTIZATIONS, torch_dtype

EXIT_OK = 0
EXIT_ERROR = 2

DESCRIPTION = """\
OLoRA/LoRA adapters: train them, convert OLoRA/PiSSA adapters to plain LoRA, try them, serve them.

An OLoRA adapter as PEFT saves it only works on a base whose weights went through the OLoRA init
(PEFT subtracts the initial factors from the base). `olora convert` turns it into a plain LoRA
adapter for the original base, which can share one base with any number of other adapters."""

EPILOG = """\
examples:
  olora train --data examples/shout.jsonl --out runs/shout --steps 150
  olora generate --adapter runs/shout/converted --prompt $'text: Return the list of items.\\nshout:'
  olora convert --initial runs/shout/initial --trained runs/shout/trained --out shout-lora
  olora serve --help"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the paragraphs of descriptions; appends "(default: X)" where a default is worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.option_strings and not any(action.default is skip for skip in (None, False, argparse.SUPPRESS)):
            help_text += " (default: %(default)s)"
        return help_text


def _paragraphs(*texts: str) -> str:
    return "\n\n".join(textwrap.fill(" ".join(text.split()), width=88) for text in texts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olora", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("default-model", formatter_class=_Formatter,
                       help="print the path of the embedded default base model",
                       description=_paragraphs("Print the absolute path of the small default base model "
                                               "shipped with olora_core (a Hugging Face model directory)."))
    p.set_defaults(handler=_cmd_default_model)

    p = sub.add_parser("convert", formatter_class=_Formatter,
                       help="convert an OLoRA/PiSSA adapter into a plain LoRA adapter",
                       description=_paragraphs(
                           "Convert a trained OLoRA/PiSSA PEFT adapter into a plain LoRA adapter (rank 2r) "
                           "that runs on the ORIGINAL base model. Needs the untrained initial checkpoint "
                           "that was saved before training (olora train writes it to OUT/initial).",
                           "Nothing is written when the conversion fails; the error goes to stderr and "
                           "the exit status is 2."))
    p.add_argument("--initial", type=Path, metavar="DIR",
                   help="the untrained adapter saved right after the OLoRA/PiSSA init (or --recompute-init)")
    p.add_argument("--trained", required=True, type=Path, metavar="DIR", help="the trained adapter")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the converted adapter")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    _add_beyond_peft_convert_flags(p)  # --- Beyond PEFT (olora_core/quant_convert.py, recompute_init.py)
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("train", formatter_class=_Formatter,
                       help="train an OLoRA (or PiSSA/LoRA) adapter and convert it",
                       description=_paragraphs(
                           "Train an adapter with PEFT and a plain torch loop (AdamW, constant lr, gradients "
                           "clipped to norm 1, seeded: the same seed gives the same adapter on CPU).",
                           "Writes OUT/initial (the untrained adapter, saved before training), OUT/trained "
                           "(as PEFT saves it), OUT/converted (a plain LoRA adapter for the original base; "
                           "not for --init lora, which needs no conversion) and OUT/train_report.json "
                           "(loss per step, config, timings).",
                           "--share-safe (OLoRA/PiSSA) never mutates the base: OUT/initial and OUT/trained are then "
                           "plain LoRA adapters of rank 2r for the unmodified base (with --quantize: the base "
                           "quantized as `olora serve --quantize` does), OUT/trained being exactly the trained "
                           "model; nothing is converted.",
                           "--data is a .txt file (cut into --seq-len token chunks) or a .jsonl file with "
                           'one {"text": ...} or {"prompt": ..., "completion": ...} object per line (loss '
                           "only on the completion and the end-of-sequence token)."))
    p.add_argument("--base", type=Path, default=None, metavar="DIR",
                   help="base model directory (default: the embedded default model)")
    p.add_argument("--data", required=True, type=Path, metavar="FILE", help="training data (.txt or .jsonl)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--r", type=int, default=8, help="adapter rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha/r)")
    p.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module names to adapt, or 'all-linear'")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step")
    p.add_argument("--seq-len", type=int, default=128, help="maximum tokens per example")
    p.add_argument("--seed", type=int, default=0, help="seed for the init and the data order")
    p.add_argument("--init", choices=("olora", "pissa", "lora"), default="olora", help="adapter initialisation")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                   help="dtype to load the base in (float32 keeps the conversion exact)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                   help="load the base with bitsandbytes as `olora serve --quantize` does (compute dtype: --dtype)")
    p.add_argument("--share-safe", action="store_true",
                   help="OLoRA/PiSSA without mutating the base: a frozen, negated copy of the init sits beside "
                        "the trained adapter, and OUT/trained is a plain LoRA (rank 2r) that is exactly the trained "
                        "model on the shared (quantized) base; nothing to convert. Use the server's --quantize and "
                        "--dtype (docs/beyond-peft.md)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads while training (default: torch's choice; on a busy machine 1 is "
                        "often fastest; results are reproducible for a fixed thread count)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous training output in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("generate", formatter_class=_Formatter,
                       help="greedy generation from a base model, optionally with an adapter",
                       description=_paragraphs(
                           "Greedy generation for quick manual checks: prints the continuation of --prompt "
                           "(without the prompt itself).",
                           "With --adapter the PEFT adapter is applied: a converted adapter or any plain "
                           "LoRA adapter, or an unconverted OLoRA adapter (PEFT re-runs its init on the "
                           "base when it loads one)."))
    p.add_argument("--base", type=Path, default=None, metavar="DIR",
                   help="base model directory (default: the embedded default model)")
    p.add_argument("--adapter", type=Path, default=None, metavar="DIR", help="PEFT adapter directory")
    p.add_argument("--prompt", required=True, help="prompt text (use $'...\\n' in bash for newlines)")
    p.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="tokens to generate at most")
    p.set_defaults(handler=_cmd_generate)

    p = sub.add_parser("serve", add_help=False, help="run the HTTP server (see `olora serve --help`)",
                       description="Run the HTTP adapter server; all arguments go to the server.")
    p.set_defaults(handler=None)
    return parser


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, deprecation notes, optional-kernel notices) off the terminal."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"peft\.")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # everything after `serve` belongs to the server's own parser
        return _cmd_serve(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    from olora_core.errors import OLoRAError

    _quiet_libraries()
    try:
        return args.handler(args)
    except OLoRAError as exc:
        _print_error(exc)
        return EXIT_ERROR


def _print_error(exc: BaseException) -> None:
    print(f"error: {exc}", file=sys.stderr)
    for note in getattr(exc, "__notes__", ()):
        print(f"note: {note}", file=sys.stderr)


def _missing_component(what: str) -> int:
    print(f"error: {what}", file=sys.stderr)
    return EXIT_ERROR


def _default_model_dir() -> Path | None:
    """The embedded default model's directory; None in a build without it."""
    try:
        from olora_core.default_model import DefaultModelError, default_model_path
    except ImportError:
        return None
    from olora_core.errors import OLoRAError

    try:
        return default_model_path()
    except DefaultModelError as exc:  # a RuntimeError there: the install is incomplete
        raise OLoRAError(str(exc)) from exc


def _resolve_base(base: Path | None) -> Path | None:
    return base if base is not None else _default_model_dir()


def _cmd_default_model(args: argparse.Namespace) -> int:
    path = _default_model_dir()
    if path is None:
        return _missing_component("the default model is not installed in this build")
    print(path)
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.recompute_init or args.quantization != "none":  # --- Beyond PEFT
        return _cmd_convert_beyond_peft(args)
    if args.initial is None:
        return _missing_component("--initial DIR is required (or --recompute-init --base DIR)")
    if args.rank is not None or args.max_rel_error is not None:
        return _missing_component("--rank / --max-rel-error need --quantization (the quantization-aware conversion)")
    from olora_core.convert import convert

    report = convert(args.initial, args.trained, args.out, overwrite=args.overwrite)
    print(f"converted adapter written to {args.out}")
    for key, value in _report_items(report):
        print(f"  {key}: {value}")
    return EXIT_OK


# ---- Beyond PEFT: quantization-aware conversion and init recomputation (docs/beyond-peft.md) ----------------
def _add_beyond_peft_convert_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="the adapter was trained on this bitsandbytes base and is served on it: write the exact served "
                        "delta at low rank (needs --base)")
    p.add_argument("--base", type=Path, default=None, metavar="DIR",
                   help="base model directory (safetensors; for --quantization and --recompute-init)")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, default=None, metavar="K",
                      help="rank of the quantization-aware result (default: 2r, PEFT's)")
    rank.add_argument("--max-rel-error", type=float, default=None, metavar="E",
                      help="per layer, the smallest rank whose relative Frobenius error is <= E")
    p.add_argument("--recompute-init", action="store_true",
                   help="no --initial: recompute the OLoRA/PiSSA init from --base (same weights bit for bit)")
    p.add_argument("--init-dtype", choices=DTYPE_NAMES, default="float32",
                   help="dtype the base checkpoint was loaded in (before any quantization) when the adapter was "
                        "initialised")


def _cmd_convert_beyond_peft(args: argparse.Namespace) -> int:
    if args.base is None:
        return _missing_component("--quantization and --recompute-init need --base DIR (the base model directory)")
    if args.recompute_init and args.initial is not None:
        return _missing_component("--recompute-init replaces --initial; give one of them")
    if args.recompute_init:
        from olora_core.recompute_init import convert_recomputed

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            report = convert_recomputed(args.trained, args.base, args.out, init_dtype=args.init_dtype,
                                        quantization=args.quantization, rank=args.rank,
                                        max_rel_error=args.max_rel_error, overwrite=args.overwrite)
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        print(f"init recomputed from {args.base} ({report.kind}, {report.init_dtype}, {report.quantization})")
        conversion = report.conversion
    else:
        if args.initial is None:
            return _missing_component("--initial DIR is required (or --recompute-init)")
        from olora_core.quant_convert import convert_quant_aware

        conversion = convert_quant_aware(args.initial, args.trained, args.out, args.base, args.quantization,
                                         rank=args.rank, max_rel_error=args.max_rel_error,
                                         dtype=torch_dtype(args.init_dtype), overwrite=args.overwrite)
    print(f"converted adapter written to {args.out}")
    for key, value in _report_items(conversion):
        if key != "layers":
            print(f"  {key}: {value}")
    if getattr(conversion, "layers", None):
        from olora_core.quant_convert import format_layer_table

        print(format_layer_table(conversion))
    return EXIT_OK
# ---- end Beyond PEFT -----------------------------------------------------------------------------------------


def _report_items(report) -> list[tuple[str, object]]:
    """Short `key: value` lines of a dataclass report (long lists are summarised by their length)."""
    if not dataclasses.is_dataclass(report):
        return [("report", report)]
    items = []
    for fld in dataclasses.fields(report):
        value = getattr(report, fld.name)
        if isinstance(value, (list, tuple, dict, set)) and len(value) > 6:
            value = f"{len(value)} entries"
        items.append((fld.name, value))
    return items


def _cmd_train(args: argparse.Namespace) -> int:
    from olora_core.train import TrainConfig, train

    base = _resolve_base(args.base)
    if base is None:
        return _missing_component("no --base given and the default model is not installed in this build")
    targets = "all-linear" if args.targets.strip() == "all-linear" else tuple(
        name.strip() for name in args.targets.split(",") if name.strip())
    cfg = TrainConfig(base=base, data=args.data, out=args.out, r=args.r, alpha=args.alpha, targets=targets,
                      steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                      seed=args.seed, init=args.init, use_rslora=args.rslora, dtype=args.dtype,
                      quantize=args.quantize, share_safe=args.share_safe,
                      threads=args.threads, overwrite=args.overwrite, progress=not args.quiet)
    report = train(cfg)
    print(f"trained {len(report.losses)} steps in {report.timings_s['train_s']:.1f} s "
          f"(loss {report.first_loss:.4f} -> {report.last_loss:.4f}, "
          f"{report.dataset['examples']} examples, {report.trainable_params} trainable parameters)")
    print(f"  initial:   {report.initial_dir}")
    print(f"  trained:   {report.trained_dir}")
    print(f"  converted: {report.converted_dir or '-'}  ({report.conversion_note})")
    print(f"  report:    {Path(report.out_dir) / 'train_report.json'}")
    return EXIT_OK


def greedy_generate(base: str | Path, prompt: str, adapter: str | Path | None = None,
                    max_new_tokens: int = 48) -> str:
    """Greedy continuation of `prompt` (prompt not included) from `base`, with `adapter` if given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olora_core.errors import OLoRAError

    base = Path(base)
    if not (base / "config.json").is_file():
        raise OLoRAError(f"base model directory has no config.json: {base}")
    if adapter is not None and not (Path(adapter) / "adapter_model.safetensors").is_file():
        raise OLoRAError(f"adapter directory has no adapter_model.safetensors: {adapter}")
    if max_new_tokens < 1:
        raise OLoRAError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]  # (T_new,)
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    base = _resolve_base(args.base)
    if base is None:
        return _missing_component("no --base given and the default model is not installed in this build")
    print(greedy_generate(base, args.prompt, args.adapter, args.max_new_tokens))
    return EXIT_OK


def _cmd_serve(rest: list[str]) -> int:
    """The server registers itself as the `serve` entry point of group "olora.commands" (pyproject.toml):
    this library never imports it, so it stays usable without the server and its dependencies."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="olora.commands", name="serve"))
    if not found:
        print("the server is not installed in this build", file=sys.stderr)
        return EXIT_ERROR
    server_main = found[0].load()
    try:
        code = server_main(rest)
    except SystemExit as exc:  # the server's argparse: --help (0) or a usage error (2)
        code = exc.code if isinstance(exc.code, int) or exc.code is None else EXIT_ERROR
    return EXIT_OK if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
