"""spark-submit entry point: one stage of the pipeline for one date, in the cluster's driver.

    spark-submit --master spark://host:7077 jobs/submit.py --stage extract --date 2026-01-01 [--config m.toml]

It runs what `matcher run --steps STAGE` runs, with Spark's master, resources and deploy mode coming from
spark-submit. The config is --config, else the TOML file $MATCHER_CONFIG names, else the embedded defaults: the
same rule, through the same function, as an Airflow task running the stage in-process.

Exit status (what a scheduler should do next):
    0   the stage finished.
    75  retryable (EX_TEMPFAIL): storage or network down, S3 throttling, a lost executor or Spark context, another
        run holding the date; retry later.
    1   permanent: bad input, a failed gate or check, a config error, a schema mismatch, or an unexpected error
        (most likely a bug); a retry would fail the same way.
    2   usage error (argparse's own): an unknown stage, a malformed date, a missing argument.
Every failure ends with one line on stderr, `matcher: error: ...`, naming the stage, the cause and the verdict.
A failure is judged by its cause however deep it was raised (matcher/failures.py): an executor's OSError that
reaches the driver wrapped in Spark's PythonException is retryable."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Mapping

from matcher.failures import EXIT_OK, EXIT_PERMANENT, EXIT_RETRYABLE, EXIT_USAGE  # noqa: F401 (part of its API)
from matcher.logs import LOG_FORMATS, configure_logging, log_context


def checked_argument(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the value as given where `check` accepts it, else a usage error (exit 2) with the
    ValueError's message, before anything runs."""
    def argument(value: str) -> str:
        try:
            check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value
    return argument


def date_argument(value: str) -> str:
    """A --date: YYYY-MM-DD (matcher.io.lake.partition_date), else a usage error."""
    from matcher.io.lake import partition_date

    return checked_argument(partition_date)(value)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the stage; returns the exit status above. environ: the process's environment unless given (tests)."""
    from jobs.context import RunContext, load_deployment_config
    from jobs.pipeline import STAGES, run_stage
    from jobs.spark import stop_spark
    from matcher.failures import classify
    from matcher.io.s3server import storage_ready

    parser = argparse.ArgumentParser(prog="jobs/submit.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--date", required=True, type=date_argument)
    parser.add_argument("--config", default="", help="a TOML file; default $MATCHER_CONFIG, else the defaults")
    parser.add_argument("--catalog", default="")
    parser.add_argument("--lake", default="")
    parser.add_argument("--model", default="", help="score with this model version, not the date's own")
    parser.add_argument("--run-id", default="", help="the run (e.g. Airflow's) this stage belongs to: it claims "
                                                     "the date from its first stage to publish")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="log lines as text or as JSON objects with stage, date and run_id fields")
    args = parser.parse_args(argv)  # a usage error exits 2 here
    configure_logging(logging.INFO, args.log_format)
    with log_context(stage=args.stage, date=args.date, run_id=args.run_id):  # the config line's too
        status, line = EXIT_OK, ""
        try:
            cfg, source = load_deployment_config(args.config, os.environ if environ is None else environ,
                                                 catalog=args.catalog, lake=args.lake)
            logging.getLogger("matcher").info("matcher: config %s", source)
            with storage_ready(cfg) as cfg:
                ctx = RunContext(cfg, args.date, catalog=args.catalog, lake_uri=args.lake, model_version=args.model,
                                 runner=f"spark-submit {args.stage} for {args.date}", run_id=args.run_id)
                run_stage(args.stage, ctx)
                line = f"matcher: {args.date} {args.stage} done in {ctx.timings[args.stage]:.1f}s"
        except Exception as exc:  # every failure becomes an exit status a scheduler can act on
            failure = classify(exc)
            status = EXIT_RETRYABLE if failure.retryable else EXIT_PERMANENT
            line = f"matcher: error: {failure.message()} (exit {status})"
        finally:
            try:
                stop_spark()
            except Exception as exc:  # the session may be half gone after a lost JVM; the verdict stands
                logging.getLogger("matcher").warning("stopping Spark failed: %s", exc)
    # Last, after Spark's shutdown logging, so it ends the log tail that spark-submit's callers show.
    print(line, file=sys.stderr if status else sys.stdout, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
