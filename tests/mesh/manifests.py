"""The committed manifests under deploy/, read as YAML documents."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
Doc = dict[str, Any]


def documents(*relative: str) -> list[Doc]:
    """Every document of the files under deploy/ (globs allowed), in file order."""
    docs: list[Doc] = []
    for pattern in relative:
        for path in sorted(DEPLOY.glob(pattern)):
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi)?$")
_DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")


def quantity(value: str | int) -> int:
    """A Kubernetes quantity as Envoy Gateway reads a buffer size ("64Ki" -> 65536)."""
    match = _QUANTITY.match(str(value))
    assert match, f"unsupported quantity {value!r}"
    scale = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[match.group(2)]
    return int(match.group(1)) * scale


def duration(value: str) -> str:
    """A Gateway API duration as an Envoy (protobuf JSON) duration ("2s", "200ms" -> "0.200s")."""
    match = _DURATION.match(value)
    assert match, f"unsupported duration {value!r}"
    number, unit = int(match.group(1)), match.group(2)
    seconds = number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return f"{seconds:.3f}s"
