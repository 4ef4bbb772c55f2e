"""spark-submit entry point: one stage of the pipeline for one date, in the cluster's driver.

    spark-submit --master spark://host:7077 jobs/submit.py --stage extract --date 2026-01-01 --config m.toml

It runs what `matcher run --steps STAGE` runs, with Spark's master, resources and deploy mode coming from
spark-submit. Exit status 0, or 1 with one line `matcher: error: stage S failed: ...`."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from jobs.context import RunContext, StageError
    from jobs.pipeline import run_stage
    from jobs.spark import stop_spark
    from matcher.config import load_config
    from matcher.s3server import storage_ready

    parser = argparse.ArgumentParser(prog="jobs/submit.py")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--config", default="")
    parser.add_argument("--catalog", default="")
    parser.add_argument("--lake", default="")
    parser.add_argument("--model", default="", help="score with this model version, not the date's own")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        with storage_ready(load_config(args.config or None)) as cfg:
            ctx = RunContext(cfg, args.date, catalog=args.catalog, lake_uri=args.lake, model_version=args.model,
                             runner=f"spark-submit {args.stage} for {args.date}")
            run_stage(args.stage, ctx)
            print(f"matcher: {args.date} {args.stage} done in {ctx.timings[args.stage]:.1f}s", flush=True)
    except (StageError, ValueError, OSError) as exc:
        print(f"matcher: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        stop_spark()
    return 0


if __name__ == "__main__":
    sys.exit(main())
