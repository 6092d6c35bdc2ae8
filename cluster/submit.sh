#!/usr/bin/env bash
# Submit a dragons job to a running Ray cluster through the Ray Jobs API.
#
#   cluster/submit.sh train --data s3://BUCKET/dataset --out s3://BUCKET/models/NAME \
#       --storage s3://BUCKET/ray-results [--workers N] [--epochs N]
#   cluster/submit.sh score --model s3://BUCKET/models/NAME \
#       --input s3://BUCKET/images/PREFIX --output s3://BUCKET/tables/scores [--run-id ID]
#
# Runs: ray job submit --address "$RAY_ADDRESS" --working-dir . \
#           --runtime-env-json '<see below>' -- python jobs/<train|score>.py "$@"
# from the repository root, so the whole repo (minus excludes and .gitignore'd
# files) is uploaded as the job's working_dir and `dragons` is importable.
#
# Environment (read, never printed):
#   RAY_ADDRESS            Jobs API URL. Default http://127.0.0.1:8265: a local
#                          `ray start --head`, or a remote cluster reached via
#                          `ray dashboard <cfg>` / `kubectl port-forward`.
#   RAY_AUTH_MODE          Defaults to "token" here: the Ray client only sends
#                          the token when this is set. Set it to "disabled"
#                          only for a cluster started without token auth.
#   RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token
#                          Token sources, in Ray's order of precedence.
#   DRAGONS_RUNTIME_PIP=1  Also pip-install the project's core dependencies
#                          (pyproject.toml [project].dependencies, minus ray
#                          which the image provides; never the extras `local`,
#                          `report`, `dev`) into the job's runtime_env.
#                          Needed on stock rayproject/ray images (KubeRay
#                          RayCluster, launcher clusters). Leave unset for a
#                          local `ray start` from the project venv (Ray would
#                          clone the whole venv to build a pip env).
#   RAY_BIN                `ray` executable (default: `ray` on PATH, else .venv/bin/ray).
#   PYTHON                 Python >= 3.11 used to read pyproject.toml
#                          (default: .venv/bin/python, else python3).
#
# S3 credentials: passed ONLY by name. env_vars below hold the literal strings
# "${AWS_ACCESS_KEY_ID}" etc. (escaped, so this shell does not expand
# them). Ray expands `${VAR}` when it starts each worker process *on the
# cluster node*, from that node's own environment: the Kubernetes Secret
# `dragons-s3` on KubeRay, the shell that ran `ray start` locally, or
# ~/.config/dragons/s3.env on launcher clusters. So no secret value leaves this
# machine or is stored in the job's runtime_env (which `ray job list` and the
# dashboard display). Workers inherit those node variables anyway; the
# references just make the dependency explicit. So only names that are set and
# not empty in this shell are sent: Ray expands a name that is unset on a node to
# "", and this script must never *create* an empty AWS_ENDPOINT_URL on the nodes
# (leave it unset for real AWS S3; an empty one crashed delta-rs). dragons also
# treats an empty AWS_* variable as unset wherever it starts (dragons.storage).
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: cluster/submit.sh train|score [job args...]
  train  -> python jobs/train.py ARGS   (--data --out --storage [--workers] [--epochs])
  score  -> python jobs/score.py ARGS   (--model --input --output [--run-id])
Env: RAY_ADDRESS (default http://127.0.0.1:8265), RAY_AUTH_MODE (default token),
     RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token, DRAGONS_RUNTIME_PIP=1
EOF
  exit "${1:-2}"
}

[[ $# -ge 1 ]] || usage
job="$1"
shift
case "$job" in
  train | score) ;;
  -h | --help) usage 0 ;;
  *)
    echo "submit.sh: unknown job '$job'" >&2
    usage
    ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

script="jobs/${job}.py"
if [[ ! -f "$script" ]]; then
  echo "submit.sh: $script not found in $repo_root" >&2
  exit 1
fi

ray_bin="${RAY_BIN:-ray}"
if ! command -v "$ray_bin" >/dev/null 2>&1 && [[ -x .venv/bin/ray ]]; then
  ray_bin=.venv/bin/ray
fi
if ! command -v "$ray_bin" >/dev/null 2>&1; then
  echo "submit.sh: '$ray_bin' not found; activate the project venv or set RAY_BIN" >&2
  exit 1
fi

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == "token" && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  # Only check that a token is available; never read it out or print it.
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      echo "submit.sh: RAY_AUTH_TOKEN_PATH is set but the file is missing or empty" >&2
      exit 1
    fi
  elif [[ ! -s "${HOME:-/nonexistent}/.ray/auth_token" ]]; then
    cat >&2 <<'EOF'
submit.sh: no Ray auth token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
  local cluster: ray get-auth-token --generate >/dev/null   (before `ray start`)
  KubeRay:       save the cluster's Secret key auth_token to a 0600 file and set
                 RAY_AUTH_TOKEN_PATH to it (see docs/operations.md)
EOF
    exit 1
  fi
fi

# Literal ${...} on purpose: expanded by Ray on the cluster nodes (see header).
# A name unset, empty or blank here is left out; values are tested, never printed.
env_vars=''
for name in AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION; do
  if [[ "${!name:-}" =~ [^[:space:]] ]]; then
    env_vars+="${env_vars:+, }\"${name}\": \"\${${name}}\""
  fi
done
# Never upload the venv, VCS data or caches (Ray also honours .gitignore).
excludes='".venv/", ".git/", "**/__pycache__/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", "*.egg-info/"'
pip=''
if [[ "${DRAGONS_RUNTIME_PIP:-}" == "1" ]]; then
  py="${PYTHON:-}"
  if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
  fi
  # JSON list of pyproject's core dependencies without ray (single source of
  # truth); [project.optional-dependencies] (moto, matplotlib, test tools) stay out.
  pip_packages="$(
    "$py" - <<'PY'
import json, re, tomllib
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
keep = [d for d in deps if re.match(r"[A-Za-z0-9._-]+", d).group(0).lower() != "ray"]
print(json.dumps(keep))
PY
  )"
  pip=", \"pip\": {\"packages\": ${pip_packages}, \"pip_check\": false}"
fi
runtime_env="{\"env_vars\": {${env_vars}}, \"excludes\": [${excludes}]${pip}}"

echo "submit.sh: submitting ${script} to ${address}" >&2
exec "$ray_bin" job submit \
  --address "$address" \
  --working-dir . \
  --runtime-env-json "$runtime_env" \
  -- python "$script" "$@"
