"""How much feedback a drift-triggered retrain has to learn from. No Prefect import here: `loraflow status`
prints it, and importing Prefect inside the CLI would set up its logging on the CLI's streams."""

from __future__ import annotations

from pipeline import registry
from pipeline.config import Params
from pipeline.layout import CURATED_TAG, curated_count


def feedback_progress(p: Params) -> dict:
    """Curated records in the data version vs the latest registered version's (its ``curated_records``
    tag): how many are new, and how many a drift-triggered retrain waits for."""
    total = curated_count(p)
    latest = registry.latest_version(p.registry, p.project.name)
    trained = int(latest.tags.get(CURATED_TAG, 0) or 0) if latest else 0
    new = max(total - trained, 0)
    return {"new": new, "needed": p.curate.min_new_records, "total": total,
            "latest_version": latest.version if latest else None,
            "message": (f"waiting for feedback: {new} of {p.curate.min_new_records} new curated records"
                        if new < p.curate.min_new_records else
                        f"{new} new curated records (>= {p.curate.min_new_records})")}
