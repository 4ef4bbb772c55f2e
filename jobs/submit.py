"""spark-submit entry point: one stage of the pipeline for one date, in the cluster's driver.

    spark-submit --master spark://host:7077 jobs/submit.py --stage extract --date 2026-01-01 --config m.toml

It is `matcher run --steps STAGE` with Spark's master, resources and deploy mode coming from spark-submit."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from matcher.cli import main as matcher_main

    parser = argparse.ArgumentParser(prog="jobs/submit.py")
    parser.add_argument("--stage", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--config", default="")
    parser.add_argument("--catalog", default="")
    parser.add_argument("--lake", default="")
    args = parser.parse_args(argv)
    command = ["run", "--steps", args.stage, "--date", args.date]
    for flag in ("config", "catalog", "lake"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    return matcher_main(command)


if __name__ == "__main__":
    sys.exit(main())
