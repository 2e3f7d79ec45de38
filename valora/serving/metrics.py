"""Several replicas' `/metrics` as one Prometheus text: every sample gets a `replica` label, and each metric family
is written once (its HELP and TYPE, then every replica's samples), as the text format requires. Sums over
replicas are then one `sum without (replica)` away, and routers that score pods read each replica's series."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{.*\})?(\s.*)$")


def with_label(line: str, name: str, value: str) -> str:
    """A sample line with one more label."""
    m = _SAMPLE.match(line)
    if m is None:
        return line
    metric, labels, rest = m.groups()
    label = f'{name}="{value}"'
    inner = labels[1:-1] if labels else ""
    return f"{metric}{{{label}{',' if inner else ''}{inner}}}{rest}"


def merge(texts: dict[str, str], label: str = "replica") -> str:
    """One exposition of `texts` (replica id -> its /metrics text)."""
    families: dict[str, list[str]] = {}  # family -> its HELP/TYPE lines, then samples
    seen_header: set[tuple[str, str]] = set()
    for replica, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                lines = families.setdefault(family, [])
                if (family, line[:6]) not in seen_header:
                    seen_header.add((family, line[:6]))
                    lines.insert(sum(1 for x in lines if x.startswith("#")), line)
            elif line and not line.startswith("#"):
                name = _SAMPLE.match(line)[1] if _SAMPLE.match(line) else line
                families.setdefault(family or name, []).append(with_label(line, label, replica))
    return "".join(line + "\n" for lines in families.values() for line in lines)
