#!/usr/bin/env bash
# Runs a Spark standalone daemon (Master or Worker: the class and its arguments) with spark.authenticate, its
# secret read from a Docker secret file. The secret goes into a spark-defaults.conf only this user can read, not
# onto the command line (which `ps` shows to everyone); a worker hands it to its executors in their environment.
set -euo pipefail
secret_file=${SPARK_AUTH_SECRET_FILE:-/run/secrets/spark_secret}
secret=$(tr -d '[:space:]' < "$secret_file" 2>/dev/null || true)
if [ -z "$secret" ]; then
  echo "spark-daemon.sh: no Spark secret in $secret_file (make docker/spark-secret: openssl rand -hex 32)" >&2
  exit 1
fi
umask 077
conf_dir=$(mktemp -d "${TMPDIR:-/tmp}/spark-conf.XXXXXXXX")
printf 'spark.authenticate true\nspark.authenticate.secret %s\n' "$secret" > "$conf_dir/spark-defaults.conf"
unset secret
export SPARK_CONF_DIR=$conf_dir
exec spark-class "$@"
