"""Build the example task data sets in this folder from Python standard library docstrings.

    .venv/bin/python examples/make_examples.py        # rewrites examples/*.jsonl

Deterministic for a given Python version (the phrases are the first sentences of docstrings
in a fixed list of stdlib modules, sorted, then shuffled with a fixed seed). The default model
was pretrained on stdlib docstrings and comments, so the prompts are in-domain and only the
task's *style* is new - which makes the effect of a trained adapter obvious in greedy output:

- shout:  ``text: <phrase>\\nshout:`` -> `` <PHRASE IN UPPER CASE>``
- pirate: ``text: <phrase>\\npirate:`` -> `` Arr! <phrase in pirate speak>, matey!``

Every third example is a plain continuation instead, so the style also shows on a bare prompt
(as a server demo would send it): prompt = the first half of the phrase's words, completion = the
rest in the task's style, e.g. ``Return the number`` -> `` OF ITEMS.`` / `` o' items, matey!``.

Each task gets ``<task>.jsonl`` (training) and ``<task>-heldout.jsonl`` (phrases that are not in
the training file, for checking an adapter on prompts it never saw).
"""
from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
TRAIN_SIZE = 200
HELDOUT_SIZE = 24
MODULES = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "codecs.py",
    "collections/__init__.py", "configparser.py", "contextlib.py", "copy.py", "csv.py", "datetime.py",
    "difflib.py", "dis.py", "email/message.py", "enum.py", "fnmatch.py", "fractions.py", "ftplib.py",
    "functools.py", "genericpath.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py",
    "hmac.py", "http/client.py", "http/cookiejar.py", "imaplib.py", "inspect.py", "ipaddress.py",
    "json/decoder.py", "json/encoder.py", "locale.py", "logging/__init__.py", "mailbox.py",
    "mimetypes.py", "ntpath.py", "os.py", "pathlib/__init__.py", "pathlib.py", "pickle.py", "pkgutil.py",
    "platform.py", "plistlib.py", "poplib.py", "posixpath.py", "pprint.py", "pydoc.py", "queue.py",
    "random.py", "re/__init__.py", "shlex.py", "shutil.py", "smtplib.py", "socket.py", "statistics.py",
    "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py",
    "tokenize.py", "trace.py", "traceback.py", "typing.py", "unittest/case.py", "urllib/parse.py",
    "urllib/request.py", "uuid.py", "warnings.py", "weakref.py", "zipfile/__init__.py", "zipfile.py",
)
PHRASE_RE = re.compile(r"[A-Z][a-z]+( [a-z][a-z'-]*){2,8}\.")  # plain lower-case sentence, 3-9 words

PIRATE_WORDS = {"the": "th'", "of": "o'", "you": "ye", "your": "yer", "is": "be", "are": "be",
                "my": "me", "for": "fer", "to": "t'", "and": "an'", "with": "wit'"}


def docstring_phrases() -> list[str]:
    """First sentences of function/class docstrings that are short, plain English sentences."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    phrases: set[str] = set()
    for relative in MODULES:
        path = stdlib / relative
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first = " ".join(doc.split("\n\n")[0].split())
            first = first.split(". ")[0].rstrip(".") + "."
            if PHRASE_RE.fullmatch(first) and 16 <= len(first) <= 56:
                phrases.add(first)
    return sorted(phrases)


def shout(phrase: str, whole: bool = True) -> str:
    return phrase.upper()


def pirate(phrase: str, whole: bool = True) -> str:
    """`whole`: the full phrase (with "Arr!" and its first word kept); else the tail of a phrase."""
    words = phrase.rstrip(".").split()
    words = [PIRATE_WORDS.get(word.lower(), word) if i or not whole else word for i, word in enumerate(words)]
    return ("Arr! " if whole else "") + " ".join(words) + ", matey!"


TASKS = {"shout": shout, "pirate": pirate}
CONTINUATION_EVERY = 3  # every third example is a bare-prompt continuation


def record(task: str, phrase: str, index: int) -> dict[str, str]:
    if index % CONTINUATION_EVERY == CONTINUATION_EVERY - 1:
        words = phrase.split()
        head, tail = words[:len(words) // 2], words[len(words) // 2:]
        return {"prompt": " ".join(head), "completion": " " + TASKS[task](" ".join(tail), whole=False)}
    return {"prompt": f"text: {phrase}\n{task}:", "completion": " " + TASKS[task](phrase)}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    phrases = docstring_phrases()
    if len(phrases) < TRAIN_SIZE + HELDOUT_SIZE:
        raise SystemExit(f"only {len(phrases)} phrases found, need {TRAIN_SIZE + HELDOUT_SIZE}")
    for task in TASKS:
        picked = list(phrases)
        random.Random(f"{SEED}-{task}").shuffle(picked)
        train, heldout = picked[:TRAIN_SIZE], picked[TRAIN_SIZE:TRAIN_SIZE + HELDOUT_SIZE]
        write_jsonl(HERE / f"{task}.jsonl", [record(task, phrase, i) for i, phrase in enumerate(train)])
        write_jsonl(HERE / f"{task}-heldout.jsonl", [record(task, phrase, i) for i, phrase in enumerate(heldout)])
        print(f"{task}: {len(train)} training and {len(heldout)} held-out examples "
              f"(from {len(phrases)} docstring phrases)")


if __name__ == "__main__":
    main()
