# PostgreSQL for the store tests: tests/test_store*.py also run on a real server when MPLUS_TEST_PG_URL is set.
# Sourced by .ci/run (root, Debian, non-interactive).
export DEBIAN_FRONTEND=noninteractive
if ! command -v pg_lsclusters >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
fi
read -r PG_VER PG_CLUSTER < <(pg_lsclusters --no-header | awk 'NR==1 {print $1, $2}')
pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start >/dev/null 2>&1 || true   # already running is fine
until pg_isready -q -h 127.0.0.1; do sleep 0.5; done
if ! runuser -u postgres -- psql -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'mplus'" | grep -q 1; then
    runuser -u postgres -- psql -q -c "CREATE ROLE mplus LOGIN PASSWORD 'mplus' CREATEDB"
fi
export MPLUS_TEST_PG_URL="postgresql://mplus:mplus@127.0.0.1/postgres"
