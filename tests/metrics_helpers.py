"""Scraping ``/metrics`` in tests: parsed with prometheus_client's own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.tether_run import get

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a text-format scrape: ``(name, sorted labels) -> value``."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: Any) -> float:
    """A sample's value, 0 when absent (a labelled series appears on first use)."""
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def families(text: str) -> dict[str, str]:
    """Family name -> type, as the scrape declares them."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


async def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    response = await get(f"http://{host}:{port}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


__all__ = ["Samples", "families", "parse", "scrape", "value"]
