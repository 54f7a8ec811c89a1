"""YAML from files kdl does not trust (configs, a run's config.yaml): safe tags only, and a
bound on what aliases expand to and on nesting, checked on the parsed graph before anything is
built from it, so a few hundred bytes can never stand for billions of values or a deep stack.
"""

from __future__ import annotations

from typing import Any

MAX_VALUES = 100_000  # a config has a few hundred values; aliases may not expand beyond this
MAX_DEPTH = 100


class UnsafeYaml(ValueError):
    """Text that is not valid YAML or that expands beyond the bounds; says why and where."""


class TooLarge(UnsafeYaml):
    """YAML beyond the bounds: aliases that expand too far, or nesting too deep."""


def parse(text: str) -> Any:
    """The one YAML document in `text` (None if empty), through libyaml where PyYAML has it."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "maximum nesting depth" in problem:  # libyaml's own bound (1,000), beyond ours
            raise TooLarge(f"is refused: it nests more than {MAX_DEPTH} levels deep") from None
        raise UnsafeYaml(f"is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise TooLarge(f"is refused: it nests more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: Any) -> None:
    """How many values the document holds once every alias is expanded, counted without
    expanding (each node's count is kept), and how deep it nests; refuse beyond the bounds."""
    counts: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, finished = stack.pop()
        if finished:
            counts[id(node)] = 1 + sum(counts[id(child)] for child in _children(node))
            on_path.discard(id(node))
            if counts[id(node)] > MAX_VALUES:
                raise TooLarge(f"is refused: its aliases (*name) expand to more than "
                                 f"{MAX_VALUES:,} values; write the values out instead")
            continue
        if id(node) in counts:
            continue
        if depth > MAX_DEPTH:
            raise TooLarge(f"is refused: it nests more than {MAX_DEPTH} levels deep")
        on_path.add(id(node))
        stack.append((node, depth, True))
        for child in _children(node):
            if id(child) in on_path:
                raise TooLarge("is refused: an alias (*name) refers to a value that holds it")
            if id(child) not in counts:
                stack.append((child, depth + 1, False))
