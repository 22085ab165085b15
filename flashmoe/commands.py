"""The list of CLI commands. Each command module exposes click commands; add new ones here."""
from __future__ import annotations


def all_commands():
    import importlib

    out = []
    for modname, attrs in _COMMANDS:
        mod = importlib.import_module(modname)
        for a in attrs:
            out.append(getattr(mod, a))
    return out


# (module, [click command attribute names])
_COMMANDS = [
    ("flashmoe.cmd_run", ["generate", "trace"]),
    ("flashmoe.cmd_models", ["synth", "inspect"]),
    ("flashmoe.cmd_build", ["build_cmd"]),
    ("flashmoe.cmd_rpc", ["rpc_server"]),
    ("flashmoe.cmd_policy", ["policy"]),
    ("flashmoe.cmd_repack", ["repack_cmd"]),
    ("flashmoe.cmd_chat", ["chat"]),
    ("flashmoe.cmd_serve", ["serve"]),
    ("flashmoe.cmd_quant", ["quantize", "quality"]),
    ("flashmoe.cmd_bench", ["bench"]),
    ("flashmoe.cmd_tune", ["tune"]),
    ("flashmoe.demo", ["demo"]),
]
