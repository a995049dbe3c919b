"""fedspine.cli: the command line, the top layer.

Each command parses its options, builds a typed request, makes one library call and prints.
Commands import the library inside their function on purpose (the one place where that is the
rule rather than an exception): `fedspine --help` and every command's `--help` must not load
torch, opacus or flwr. `tests/cli/test_help.py` checks it.
"""
