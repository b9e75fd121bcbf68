"""docs/configuration.md, generated from the typed config (:mod:`diffusion_core.config`) so that it
cannot drift: ``python -m diffusion_core.config_doc > docs/configuration.md`` (a test compares them)."""

from __future__ import annotations

import dataclasses

from diffusion_core.config import allowed, declared_fields, type_name, yaml_value


def markdown() -> str:
    """docs/configuration.md: every key's meaning, type, allowed values and default, by group."""
    lines = ["# Configuration: every key of params.yaml", "",
             "Generated from the typed config in `diffusion_core/config.py` by `python -m diffusion_core.config_doc > "
             "docs/configuration.md`; a test fails when the two differ. The defaults are params.yaml's values. "
             "Which measurement chose each default: [results/README.md](results/README.md).", "",
             "Besides the rules in the table, every integer is at most 2,147,483,647 (2^31 - 1), every float is "
             "finite (no NaN or infinity), and every string is non-empty. A bad value stops the stage before any "
             "work with one line that names the key.", ""]
    group = None
    for key, tp, f in declared_fields():
        g = key.split(".")[0] if "." in key else "top level"
        if g != group:
            group = g
            lines += ["", f"## {g}", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"| `{key}` | {type_name(tp)} | `{yaml_value(default)}` | {allowed(f, tp)} | {f.metadata['help']} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
