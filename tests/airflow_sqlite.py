"""SQLAlchemy connect args for an Airflow metadata database on SQLite (AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS
names this dict). SQLite lets one writer in at a time and Python's driver gives up on a locked database after 5 s;
with the scheduler, DAG processor and API server of `airflow standalone` writing beside a CLI command on a busy
2-core machine, that failed a `backfill create` once. Waiting longer for the lock is what a SQLite deployment needs."""
connect_args = {"timeout": 120}
