"""Parameter paths: the one vocabulary for everything keyed by a parameter.

A path is the `/`-joined chain of dict keys, e.g. `layers/3/attn/q_proj/kernel`. Freezing, LoRA
targets, weight decay and sharding all use ordered rule tables of regexes over these paths: the
first rule whose regex `re.fullmatch`es a path wins; a rule that matches nothing is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_string(key_path) -> str:
    """`/`-joined string of a `jax.tree_util` key path."""
    return "/".join(_key_name(k) for k in key_path)


def flatten(tree) -> dict[str, Any]:
    """`{path: leaf}` for every leaf of a nested-dict tree, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_string(p): leaf for p, leaf in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten`; numeric path segments become int keys (layer indices)."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return out


def map_with_path(fn, tree):
    """`jax.tree.map` whose function also receives the leaf's path string."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_string(p), x), tree)


def match_rules(tree, rules: Sequence[tuple[str, T]], *, what: str = "rule",
                default: Any = ..., require_all_used: bool = True):
    """Map each leaf to the value of the first `(regex, value)` rule fully matching its path.

    Args:
        tree: nested-dict parameter tree (leaves may be arrays or shape structs).
        rules: ordered `(regex, value)` pairs; first match wins.
        what: name used in error messages ("freeze rule", "sharding rule", ...).
        default: value for unmatched paths; without one an unmatched path is an error.
        require_all_used: raise if a rule's regex matches no path at all (even if shadowed).

    Returns:
        A tree of the same structure holding the chosen values.
    """
    compiled = [(re.compile(pattern), value) for pattern, value in rules]

    def choose(path: str, _):
        for regex, value in compiled:
            if regex.fullmatch(path):
                return value
        if default is ...:
            raise ValueError(f"no {what} matches parameter path {path!r}")
        return default

    out = map_with_path(choose, tree)
    if require_all_used:
        require_matches(tree, [pattern for pattern, _ in rules], what=what)
    return out


def require_matches(tree, regexes: Sequence[str], *, what: str = "rule") -> None:
    """Raise if any regex fully matches no path of `tree` (a typo would silently do nothing)."""
    paths = list(flatten(tree))
    for pattern in regexes:
        regex = re.compile(pattern)
        if not any(regex.fullmatch(path) for path in paths):
            raise ValueError(f"{what} regex {pattern!r} matches no parameter path "
                             f"(paths look like: {', '.join(paths[:6])}, ...)")
