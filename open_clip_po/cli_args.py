"""Small command-line helpers shared by the CLIs."""
from __future__ import annotations


def negative_values_as_one_token(argv: list[str], flags: tuple[str, ...] = ("--t",)) -> list[str]:
    """``--t -1e-3`` → ``--t=-1e-3`` (also ``-2``, ``-4:4:0.5``, ``-.5``).

    argparse reads a value that starts with "-" as an option unless it looks like a plain negative
    number, so exponents and ranges would otherwise be refused.
    """
    out, i = [], 0
    while i < len(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if argv[i] in flags and len(value) > 1 and value[0] == "-" and (value[1].isdigit() or value[1] == "."):
            out.append(f"{argv[i]}={value}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out
