"""Small pieces every part of the Envoy config renderer writes the same way."""

from __future__ import annotations

import json
from pathlib import Path

T = "type.googleapis.com/envoy."  # the type URL prefix of every Envoy extension config
# A route's per-filter config that turns one HTTP filter off there.
DISABLED_ON_ROUTE = f'{{ "@type": {T}config.route.v3.FilterConfig, disabled: true }}'


def scalar(value: str | Path) -> str:
    """A YAML scalar for any text: JSON strings are valid YAML flow scalars."""
    return json.dumps(str(value))
