#!/usr/bin/env bash
# Newest-stack CI lane: the unit + integration suites and one 2-rank torchrun test on the stack our
# users have (Python 3.13, the newest megatron-core, a recent torch), inside a debootstrapped
# Debian trixie root.
#
#   bash .ci/newest_stack.sh            # from any checkout; builds the root once, then reuses it
#   GENLIP_CI_CACHE=/path bash .ci/newest_stack.sh
#   bash .ci/newest_stack.sh --build-only
#   bash .ci/newest_stack.sh --relock   # rewrite the lock from requirements/ci.txt (see relock())
#
# Cache: $GENLIP_CI_CACHE (default /var/cache/genlip-ci, outside the clone, so it survives CI's
# fresh clones), three layers: base-<key>/rootfs (debootstrap; key = Debian suite + packages),
# venv-<key>/venv (bind-mounted read-only at /opt/venv; key = base key + .ci/newest_stack/
# requirements.lock, every wheel pinned) and wheels-cp313/ (downloaded wheels, shared by all keys).
# Wheels are downloaded on the host (its pip trusts the machine's certificates; Python 3.13's
# stricter X.509 checks refuse the proxy's self-signed chain) and installed in the root offline.
# Changing the lock rebuilds only the venv; other keys' layers are removed after a build.
#
# Output: the pytest logs, then one line per step and a final
#   NEWEST-STACK <python/torch/megatron versions> unit+integration: N passed, M skipped, ...
# which is also written to $GENLIP_CI_SUMMARY (default $GENLIP_CI_CACHE/last-summary.txt; .ci/run
# prints it at the end).
# Exit status: 0 when every step passed, 1 when a test step failed, 2 on a build error.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${GENLIP_CI_CACHE:-/var/cache/genlip-ci}
LOCK=$ROOT/.ci/newest_stack/requirements.lock
SUITE=trixie
MIRROR=http://deb.debian.org/debian
DEB_PACKAGES=python3,python3-venv,ca-certificates
# The lane's own top-level pins; everything else comes from requirements/ci.txt (--relock).
LANE_PINS=(torch==2.10.0 megatron-core==0.19.2)
# The lane's single torchrun test: training + distributed-optimizer + torch_dist checkpoint save
# and a resharded resume (TP/PP change), the paths most exposed to megatron/torch API changes.
TORCHRUN_TEST=tests/multirank/test_training_parallel.py::test_resume_under_changed_tp_pp_layout
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64
           manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux2010_x86_64 manylinux_2_12_x86_64 linux_x86_64 any)

BASE_RECIPE="suite=$SUITE packages=$DEB_PACKAGES variant=minbase"
BASE_KEY=$(echo "$BASE_RECIPE" | sha256sum | cut -c1-12)
VENV_KEY=$( { echo "$BASE_KEY venv=1"; grep -v '^#' "$LOCK"; } | sha256sum | cut -c1-12)
BASE_DIR=$CACHE/base-$BASE_KEY           # the debootstrapped root (rootfs/)
VENV_DIR=$CACHE/venv-$VENV_KEY           # the venv, bind-mounted at /opt/venv in the root
ROOTFS=$BASE_DIR/rootfs
WHEELS=$CACHE/wheels-cp313
SUMMARY=${GENLIP_CI_SUMMARY:-$CACHE/last-summary.txt}

log() { echo "[newest-stack] $*" >&2; }
die() { echo "error: newest-stack lane: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------------------------
# build (each layer once per key; serialised with flock so two CI runs never build the same one)
# ------------------------------------------------------------------------------------------------

download_wheels() {
  local plat=() p
  for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  mkdir -p "$WHEELS"
  # --no-deps: the lock is complete; host pip only fetches files not yet in $WHEELS.
  local rc=0
  PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.13 --implementation cp --abi cp313 --abi abi3 --abi none "${plat[@]}" \
    -d "$WHEELS" -r "$LOCK" || rc=$?
  return $rc
}

prune() {  # remove other keys' layers of the given kind (disk: a venv is ~8 GB)
  local kind=$1 keep=$2 old
  for old in "$CACHE/$kind"-*; do
    [[ "$old" == "$keep" || ! -d "$old" ]] && continue
    log "removing $old (another key)"; rm -rf "$old"
  done
}

build_base() {
  local tmp=$BASE_DIR.partial
  command -v debootstrap >/dev/null || { log "installing debootstrap (Debian apt)";
    apt-get install -y -q debootstrap >/dev/null || die "apt-get install debootstrap failed"; }
  rm -rf "$tmp"; mkdir -p "$tmp"
  log "debootstrap $SUITE into $tmp/rootfs"
  debootstrap --variant=minbase --include="$DEB_PACKAGES" "$SUITE" "$tmp/rootfs" "$MIRROR" \
    > "$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
  mkdir -p "$tmp/rootfs/opt/venv" "$tmp/rootfs/wheels" "$tmp/rootfs/src"
  rm -rf "$BASE_DIR"; mv "$tmp" "$BASE_DIR"; touch "$BASE_DIR/ready"
  prune base "$BASE_DIR"
}

build_venv() {  # after download_wheels
  local tmp=$VENV_DIR.partial t1=$SECONDS
  rm -rf "$tmp"; mkdir -p "$tmp/venv"
  cp "$LOCK" "$tmp/venv/requirements.lock"
  log "installing $(grep -vc '^#' "$LOCK") pinned wheels into /opt/venv (offline)"
  unshare --mount --propagation private bash -c '
    set -e
    mount --bind -o ro "$1" "$2/wheels"
    mount --bind "$3/venv" "$2/opt/venv"
    chroot "$2" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 sh -c "
      python3 -m venv /opt/venv &&
      /opt/venv/bin/pip install -q --disable-pip-version-check --no-index --no-deps \
        --find-links /wheels -r /opt/venv/requirements.lock &&
      /opt/venv/bin/pip check --disable-pip-version-check"
  ' _ "$WHEELS" "$ROOTFS" "$tmp" > "$tmp/install.log" 2>&1 || { tail -20 "$tmp/install.log" >&2;
    die "pip install into the root failed (log: $tmp/install.log)"; }
  echo "install_s=$((SECONDS - t1))" > "$tmp/build-times.txt"
  rm -rf "$VENV_DIR"; mv "$tmp" "$VENV_DIR"; touch "$VENV_DIR/ready"
  prune venv "$VENV_DIR"
}

ensure_env() {
  mkdir -p "$CACHE"
  exec 9> "$CACHE/.lock"
  flock 9
  local t0=$SECONDS notes=() dl_pid=""
  if [[ ! -f "$VENV_DIR/ready" ]]; then  # download (network) while debootstrap runs (disk, CPU)
    log "downloading wheels into $WHEELS"
    download_wheels > "$CACHE/download.log" 2>&1 &
    dl_pid=$!
  fi
  if [[ -f "$BASE_DIR/ready" ]]; then notes+=("root cached"); else
    build_base; notes+=("root built $((SECONDS - t0)) s"); fi
  if [[ -n "$dl_pid" ]]; then
    wait "$dl_pid" || { grep -v "^WARNING: Location" "$CACHE/download.log" >&2;
      die "wheel download failed (log: $CACHE/download.log)"; }
    notes+=("wheels ready after $((SECONDS - t0)) s")
    local t1=$SECONDS
    build_venv; notes+=("venv installed in $((SECONDS - t1)) s")
  else
    notes+=("venv cached")
  fi
  flock -u 9
  BUILD_NOTE=$(IFS=,; echo "${notes[*]}" | sed 's/,/, /g')
  log "$BUILD_NOTE: $ROOTFS + $VENV_DIR"
}

# Rewrites the lock: requirements/ci.txt with torch/megatron-core replaced by LANE_PINS, resolved
# for Python 3.13 (host pip downloads with dependencies; a throwaway venv in the root resolves
# offline). Run it after adding a pin to requirements/ci.txt, then commit the lock.
relock() {
  local plat=() p top=$CACHE/relock-top.txt
  for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  { printf '%s\n' "${LANE_PINS[@]}"
    grep -E '^[A-Za-z]' "$ROOT/requirements/ci.txt" | grep -viE '^(torch|megatron-core)=='; } > "$top"
  log "downloading the top-level pins and their dependencies for Python 3.13"
  PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip download -q --only-binary=:all: \
    --python-version 3.13 --implementation cp --abi cp313 --abi abi3 --abi none "${plat[@]}" \
    -d "$WHEELS" -r "$top" || die "pip download for the lock failed"
  local header; header=$(grep '^#' "$LOCK")
  cat > "$CACHE/relock.py" <<'PY'
import json
report = json.load(open("/tmp/r.json"))
for item in sorted(report["install"], key=lambda i: i["metadata"]["name"].lower()):
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])
PY
  unshare --mount --propagation private bash -c '
    set -e
    mount --bind -o ro "$1" "$2/wheels"
    mount -t tmpfs tmpfs "$2/tmp"
    cp "$3" "$2/tmp/top.txt"; cp "$4" "$2/tmp/relock.py"
    chroot "$2" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 sh -c "
      python3 -m venv /tmp/v && /tmp/v/bin/pip install -q --disable-pip-version-check \
        --no-index --find-links /wheels --dry-run --ignore-installed --report /tmp/r.json \
        -r /tmp/top.txt >&2 && /tmp/v/bin/python /tmp/relock.py"
  ' _ "$WHEELS" "$ROOTFS" "$top" "$CACHE/relock.py" > "$CACHE/relock.txt" \
    || die "resolving the lock failed"
  { echo "$header"; cat "$CACHE/relock.txt"; } > "$LOCK"
  log "wrote $LOCK ($(wc -l < "$CACHE/relock.txt") pins); commit it"
}

# ------------------------------------------------------------------------------------------------
# run (inside a private mount namespace: every mount disappears with it; the trap unmounts too)
# ------------------------------------------------------------------------------------------------

# Runs as `unshare --mount --net ... newest_stack.sh __in_namespace`: mounts the clone at /src, runs
# the steps; prints one "STEP <name> <rc> <pytest summary>" line per step on fd 3.
in_namespace() {
  # Globals, not locals: the EXIT trap runs after this function has returned.
  RUN_TMP=$(mktemp -d "$CACHE/run-tmp.XXXXXX")
  MOUNTS=()
  cleanup() {
    local i
    for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
    rm -rf "$RUN_TMP"
  }
  trap cleanup EXIT
  ip link set lo up
  mnt() { mount "$@"; MOUNTS+=("${@: -1}"); }
  mnt --bind "$ROOT" "$ROOTFS/src"
  mnt --bind -o ro "$VENV_DIR/venv" "$ROOTFS/opt/venv"
  mnt -t proc proc "$ROOTFS/proc"
  mnt -t tmpfs -o size=4g tmpfs "$ROOTFS/dev/shm"
  mnt --bind "$RUN_TMP" "$ROOTFS/tmp"
  mnt --bind -o ro /etc/hosts "$ROOTFS/etc/hosts"   # torchrun resolves this machine's name
  # A checkout whose .cache is a symlink (git worktrees): make its target visible at the same path.
  if [[ -L "$ROOT/.cache" ]]; then
    local target; target=$(readlink -f "$ROOT/.cache")
    mkdir -p "$ROOTFS$target"; mnt --bind "$target" "$ROOTFS$target"
  fi
  run_step() {  # name, then the command run in /src
    local name=$1 rc=0; shift
    log "step $name: $*"
    chroot "$ROOTFS" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 \
      PYTHONPATH=/src OMP_NUM_THREADS=1 GENLIP_CI_LANE=newest-stack PYTHONDONTWRITEBYTECODE=1 \
      sh -c 'cd /src && exec "$@"' _ "$@" 2>&1 | tee "$RUN_TMP/$name.log" || rc=$?
    echo "STEP $name $rc $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$RUN_TMP/$name.log" \
      | tail -1 | sed -E 's/=+//g; s/^ +| +$//g')" >&3
  }
  chroot "$ROOTFS" /opt/venv/bin/python -c "import sys, torch, megatron.core as m
print('STEP versions 0 python', sys.version.split()[0], 'torch', torch.__version__,
      'megatron-core', m.__version__)" >&3 || true
  run_step unit+integration python -m pytest tests/unit tests/integration -q -p no:cacheprovider
  run_step torchrun-2rank python -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m pytest -q -x -p no:cacheprovider "$TORCHRUN_TEST"
}

main() {
  [[ $(id -u) == 0 ]] || die "needs root (debootstrap, chroot, mounts)"
  [[ -f "$LOCK" ]] || die "missing $LOCK"
  T0=$SECONDS
  if [[ "${1:-}" == "--relock" ]]; then
    mkdir -p "$CACHE"; exec 9> "$CACHE/.lock"; flock 9
    [[ -f "$BASE_DIR/ready" ]] || build_base
    relock; return 0
  fi
  ensure_env
  [[ "${1:-}" == "--build-only" ]] && return 0
  # The tokenizer tests read .cache/qwen3/tokenizer.json (make setup fetches it; idempotent).
  python3 "$ROOT/tools/fetch_qwen3_tokenizer.py" >/dev/null || log "note: Qwen3 tokenizer not fetched"

  local status versions parts step line rc counts summary
  STEPS=$(mktemp)
  trap 'rm -f "$STEPS"' EXIT
  # Private mount namespace (mounts vanish with it) and private network namespace (loopback
  # only: the tests' fixed ports cannot collide with other jobs on this machine).
  GENLIP_CI_CACHE=$CACHE unshare --mount --propagation private --net \
    bash "${BASH_SOURCE[0]}" __in_namespace 3> "$STEPS" || true

  status=0
  versions=$(sed -n 's/^STEP versions 0 //p' "$STEPS")
  parts=()
  for step in unit+integration torchrun-2rank; do
    line=$(grep "^STEP $step " "$STEPS" || true)
    rc=$(awk '{print $3}' <<< "$line"); counts=$(cut -d' ' -f4- <<< "$line")
    [[ -z "$line" ]] && { rc=1; counts="did not run"; }
    [[ "$rc" == 0 && "$counts" == *passed* && "$counts" != *failed* && "$counts" != *error* ]] \
      || status=1
    parts+=("$step: ${counts:-no pytest summary} (exit $rc)")
  done
  summary="NEWEST-STACK ${versions:-versions unknown}; $(IFS=';'; echo "${parts[*]}" | sed 's/;/; /g')"
  summary+="; ${BUILD_NOTE}; lane $((SECONDS - T0)) s; $([[ $status == 0 ]] && echo PASS || echo FAIL)"
  echo "$summary" | tee "$SUMMARY"
  return $status
}

# Everything runs inside functions that bash parsed before running them, so editing this file
# during a run cannot change that run.
if [[ "${1:-}" == "__in_namespace" ]]; then
  in_namespace
  exit 0
fi
main "$@"; exit $?   # one line: bash has read it before main runs
