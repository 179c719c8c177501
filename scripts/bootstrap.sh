# Sourced by run.sh and test.sh: make .venv and install the given requirements file into it.
# Reinstalls only when the requirements change. Needs Python 3.11+ (set PYTHON to pick one).
set -euo pipefail
requirements=$1
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: Python 3.11 or newer is needed ($python is $("$python" --version 2>&1 || echo missing))." >&2
  echo "       Install it, or point PYTHON at one: PYTHON=python3.12 $0" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.installed-$(cat requirements*.txt | sha1sum | cut -c1-12)-$(basename "$requirements" .txt)
if [ ! -f "$stamp" ]; then
  echo "Installing $requirements into .venv ..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
  touch "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
