# Sourced by test.sh: system tools some tests use, installed with apt-get when missing (as root).
# chromium: the dashboard's headless-browser test (fails without it when CI is set, else skips).
# docker-compose (Debian's v1): validates docker-compose.yml offline (the test skips without it).
install_missing() {  # install_missing COMMAND PACKAGE
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: $1 is missing (installing it needs root and apt-get); tests that need it will skip or fail"
    return 0
  fi
  echo "== installing $2"
  [ -n "${apt_updated:-}" ] || { apt-get update -qq && apt_updated=1; } || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null ||
    echo "note: installing $2 failed; tests that need it will skip or fail"
}
install_missing chromium chromium
install_missing docker-compose docker-compose
