"""Reading recipe YAML without losing anything: a key given twice is an error, not an overwrite.

PyYAML keeps the last of two equal keys, so a second ``settings:`` block at the end of a long recipe
silently replaces the first. The node graph still holds both, so it is checked before constructing.
"""

from __future__ import annotations

from typing import Any

import yaml


def yaml_path(parts: tuple) -> str:
    """``("stages", 1, "name")`` -> ``stages[1].name``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def duplicate_keys(
    node: yaml.Node | None, path: tuple = (), seen: set[int] | None = None
) -> list[str]:
    """One problem per key that a mapping (at any depth) holds more than once, with its YAML path."""
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:
        return []
    seen.add(id(node))
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key: Any = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if key is not None and key != "<<":
                ident = (key_node.tag, key)
                if ident in first:
                    problems.append(
                        f"{yaml_path((*path, key))}: duplicate key (line {line}; first at line "
                        f"{first[ident]}); YAML would keep only the last one, so merge the two"
                    )
                else:
                    first[ident] = line
            problems += duplicate_keys(value_node, (*path, key if key is not None else "?"), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += duplicate_keys(item, (*path, i), seen)
    return problems


def read_yaml(text: str) -> tuple[Any, list[str]]:
    """The document, and the duplicate keys found in it (raises ``yaml.YAMLError`` on bad syntax)."""
    problems = duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    return yaml.safe_load(text), problems
