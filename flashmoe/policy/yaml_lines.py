"""YAML that remembers where things are: every mapping and list knows the line (1-based) of
itself, of each key, each value and each item, so that policy errors can name the line.

Duplicate keys are an error (plain YAML keeps the last one silently).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List

import yaml

from flashmoe.policy.schema import PolicyError

MAX_FLOW_DEPTH = 100  # [ and { nesting in a policy file


class LineMap(dict):
    """A YAML mapping that remembers the line (1-based) of itself, of each key and each value."""

    line: int = 0

    def __init__(self):
        super().__init__()
        self.key_lines: Dict[Any, int] = {}
        self.value_lines: Dict[Any, int] = {}


class LineSeq(list):
    """A YAML list that remembers the line of itself and of each item."""

    line: int = 0

    def __init__(self):
        super().__init__()
        self.item_lines: List[int] = []


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    m = LineMap()
    m.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        kline = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise PolicyError(loader._flashmoe_source, kline, "a key must be a plain word") from None
        if key in m:
            raise PolicyError(
                loader._flashmoe_source, kline, f"duplicate key {key!r} (first at line {m.key_lines[key]})"
            )
        m[key] = loader.construct_object(value_node, deep=True)
        m.key_lines[key] = kline
        m.value_lines[key] = value_node.start_mark.line + 1
    return m


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> LineSeq:
    s = LineSeq()
    s.line = node.start_mark.line + 1
    for item in node.value:
        s.append(loader.construct_object(item, deep=True))
        s.item_lines.append(item.start_mark.line + 1)
    return s


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def load_yaml(text: str, source: str) -> Any:
    """The YAML document in ``text`` with LineMap/LineSeq for mappings and lists; PolicyError
    (``source:line: invalid YAML: ...``) when it is not valid YAML."""
    depth = 0
    for m in re.finditer(r"[\[\]{}]", text):  # PyYAML takes seconds to fail on deep nesting: refuse it first
        depth = depth + 1 if m.group() in "[{" else max(0, depth - 1)
        if depth > MAX_FLOW_DEPTH:
            raise PolicyError(source, text.count("\n", 0, m.start()) + 1, "invalid YAML: nested too deeply")
    try:
        loader = _LineLoader(text)  # the reader refuses control characters right here
    except yaml.YAMLError as e:
        raise PolicyError(source, None, f"invalid YAML: {str(e).splitlines()[0][:120]}") from None
    loader._flashmoe_source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        what = e.problem or e.context or "syntax error"
        raise PolicyError(source, line, f"invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise PolicyError(source, None, f"invalid YAML: {e}") from None
    except RecursionError:  # hostile input: nesting deeper than Python's stack
        raise PolicyError(source, None, "invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
        msg = "a number with too many digits" if "digits" in str(e) else str(e).splitlines()[0][:120]
        raise PolicyError(source, None, f"invalid YAML: {msg}") from None
    finally:
        loader.dispose()
