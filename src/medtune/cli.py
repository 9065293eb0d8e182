"""The `medtune` command: a table from subcommand to a plain function.

Each function's typed signature (config dataclasses, see `medtune.config`) is its set of flags. Only
the chosen subcommand's module is imported, so `medtune --help` and `medtune data ...` stay free of
torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from medtune import __version__

# subcommand -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data prepare": ("medtune.data.prepare:prepare", "clean, deduplicate and split a medical QA corpus"),
    "data report": ("medtune.data.report:report", "write a Markdown report with plots for a prepared data directory"),
    "data download": ("medtune.data.download:download", "download the full Toyhom Chinese medical dialogue dataset"),
    "tiny-model": ("medtune.modeling:tiny_model", "build a tiny random Qwen3 model + BPE tokenizer for CPU tests and demos"),
    "download": ("medtune.hub:download", "download base models and adapters by id (ModelScope, or --hub hf) into models/"),
    "train": ("medtune.train:train", "LoRA / QLoRA supervised fine-tuning on a prepared data directory"),
    "validate": ("medtune.validate:validate", "check recipes and accelerate configs without running them"),
    "eval": ("medtune.evaluate.run:evaluate", "evaluate the base model and adapters: BLEU/ROUGE, relevance, loss, exams, report"),
    "merge": ("medtune.merge:merge", "fold an adapter into its full-precision base: a standalone Hugging Face model"),
    "export": ("medtune.export:export", "export a merged model as GGUF (f16/q8_0) with an Ollama Modelfile"),
    "ask": ("medtune.ask:ask", "answer a question (streamed) or a JSONL file of questions, with the safety layer"),
    "chat": ("medtune.ask:chat", "multi-turn chat in the terminal (streaming, /reset, /exit, Ctrl-C stops an answer)"),
    "serve": ("medtune.serve:serve", "serve the model: OpenAI-compatible API + Chinese web page (HF engine or vLLM)"),
}


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in COMMANDS:
        head, *rest = name.split(" ", 1)
        groups.setdefault(head, [])
        if rest:
            groups[head].append(rest[0])
    return groups


def load_function(name: str) -> Callable:
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, str | None]:
    """The parser for ``argv``: full flags only for the subcommand that ``argv`` names."""
    from medtune.config import add_arguments

    parser = argparse.ArgumentParser(
        prog="medtune", description="Chinese medical QA fine-tuning toolkit (data, LoRA/QLoRA, eval, serving).")
    parser.add_argument("--version", action="version", version=f"medtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = None
    words = [a for a in argv if not a.startswith("-")]
    for head, children in _groups().items():
        if children:
            p = sub.add_parser(head, help=f"{head} commands: {', '.join(children)}")
            sub2 = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            for child in children:
                full = f"{head} {child}"
                cp = sub2.add_parser(child, help=COMMANDS[full][1], description=COMMANDS[full][1])
                if words[:2] == [head, child]:
                    add_arguments(cp, load_function(full))
                    cp.set_defaults(_command=full)
                    chosen = full
        else:
            p = sub.add_parser(head, help=COMMANDS[head][1], description=COMMANDS[head][1])
            if words[:1] == [head]:
                add_arguments(p, load_function(head))
                p.set_defaults(_command=head)
                chosen = head
    return parser, chosen


def parse(argv: Sequence[str]) -> tuple[str, dict]:
    """Parse ``argv`` into (command name, keyword arguments for its function); used by tests too."""
    from medtune.config import resolve

    parser, _ = build_parser(argv)
    ns = vars(parser.parse_args(argv))
    command = ns.pop("_command", None)
    if command is None:
        parser.print_help()
        raise SystemExit(2)
    config = ns.pop("config", None)
    for key in ("command", "subcommand", "verbose"):
        ns.pop(key, None)
    return command, resolve(load_function(command), ns, config)


def main(argv: Sequence[str] | None = None) -> int:
    from medtune.config import ConfigError
    from medtune.errors import MedtuneError

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if ("-v" in argv or "--verbose" in argv) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        command, kwargs = parse(argv)
        result = load_function(command)(**kwargs)
    except (ConfigError, MedtuneError) as e:
        print(f"medtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medtune: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
