"""Reading Prometheus text the way a scraper does (prometheus-client's own parser)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[str, float]:
    """Every sample as ``name`` or ``name{label="value",...}`` -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def prometheus_samples(path: Path) -> dict[str, float]:
    """The samples of a metrics file."""
    return samples(path.read_text(encoding="utf-8"))
