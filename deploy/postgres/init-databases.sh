#!/bin/sh
# Creates the MLflow and Optuna databases, each owned by its own login role of the same name, and shuts
# other roles out of them. PostgreSQL's image runs this once, on the first start of an empty data volume
# (/docker-entrypoint-initdb.d); run it by hand with PGHOST/PGPORT set to prepare any other server.
#
# Names are validated before use; passwords never enter the SQL text or a command line: psql reads them
# from the environment (\getenv) and quotes them as literals (:'var'), identifiers as :"var".
set -eu

: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD}"
MLFLOW_DB="${MLFLOW_DB:-mlflow}"
OPTUNA_DB="${OPTUNA_DB:-optuna}"

for name in "$MLFLOW_DB" "$OPTUNA_DB"; do
    case "$name" in
        "" | [!a-z_]* | *[!a-z0-9_]*)
            echo "init-databases: invalid database name '$name': use lower-case letters, digits and _" >&2
            exit 1 ;;
    esac
done
if [ "$MLFLOW_DB" = "$OPTUNA_DB" ]; then
    echo "init-databases: MLFLOW_DB and OPTUNA_DB must differ" >&2
    exit 1
fi

export MLFLOW_DB OPTUNA_DB
psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "${POSTGRES_USER:-postgres}" --dbname postgres <<'SQL'
\getenv mlflow_db MLFLOW_DB
\getenv mlflow_pw MLFLOW_DB_PASSWORD
\getenv optuna_db OPTUNA_DB
\getenv optuna_pw OPTUNA_DB_PASSWORD
CREATE ROLE :"mlflow_db" LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_db";
REVOKE ALL ON DATABASE :"mlflow_db" FROM PUBLIC;
CREATE ROLE :"optuna_db" LOGIN PASSWORD :'optuna_pw';
CREATE DATABASE :"optuna_db" OWNER :"optuna_db";
REVOKE ALL ON DATABASE :"optuna_db" FROM PUBLIC;
SQL
echo "init-databases: created databases $MLFLOW_DB and $OPTUNA_DB"
