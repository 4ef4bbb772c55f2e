"""clean: the raw catalog -> clean/ and quarantine/ partitions."""
from __future__ import annotations

from jobs.context import RunContext, log, throughput
from matcher.catalog import CatalogReader
from matcher.clean import clean_catalog
from matcher.tables import to_arrow


def run(ctx: RunContext) -> dict:
    if not ctx.catalog:
        raise ValueError("no catalog given (--catalog or run.catalog in the config)")
    reader = CatalogReader(ctx.catalog, ctx.config.storage, ctx.config.catalog)
    raw = reader.read()
    input_rows = len(raw.rows) + len(raw.bad_lines)
    with throughput("clean", input_rows):
        result = clean_catalog(raw, reader.read_image, ctx.config.clean)
    stats = result.stats(input_rows)
    ctx.lake.write_partition("clean", ctx.date, to_arrow("clean", result.clean))
    ctx.lake.write_partition("quarantine", ctx.date, to_arrow("quarantine", result.quarantine))
    log.info("clean: %d rows in, %d clean, %d quarantined %s", input_rows, stats["clean_rows"],
             stats["quarantined_rows"], stats["quarantine_by_reason"])
    return stats
