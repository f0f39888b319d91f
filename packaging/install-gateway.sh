#!/usr/bin/env bash
# Installs the Python Firezone Gateway as a systemd service from a pinned wheel.
#
# Reads the variables of Firezone's scripts/gateway-systemd-install.sh (docs/protocol.md §6.1) and writes every
# gateway setting it is given into /etc/firezone/gateway-env, which the unit reads, so none is lost on the way
# (FIREZONE_LOG_FORMAT and FIREZONE_FLOW_LOGS included).
#
# Required:
#   FIREZONE_WHEEL          path or https URL of firezone_gateway_py-<version>-py3-none-any.whl
#   FIREZONE_WHEEL_SHA256   its sha256 (the install refuses any other file)
#   FIREZONE_TOKEN          portal token, unless /etc/firezone/gateway-token already exists
# Optional gateway settings (unset ones keep the gateway's defaults, see README "Configuration"):
#   FIREZONE_ID             default: kept from a previous install, else a fresh random 64-hex id
#   FIREZONE_NAME FIREZONE_API_URL FIREZONE_LOG_FORMAT FIREZONE_LOG_LEVEL RUST_LOG FIREZONE_FLOW_LOGS
#   FIREZONE_MAX_PARTITION_TIME FIREZONE_NO_INC_BUF FIREZONE_NUM_TUN_THREADS FIREZONE_NO_TELEMETRY
#   FIREZONE_NO_HOST_SETUP HEALTH_CHECK_ADDR
#   OTLP_GRPC_ENDPOINT, GOOGLE_CLOUD_PROJECT_ID (also FIREZONE_-prefixed): accepted, unused (no OTLP export).
# Installer options:
#   FIREZONE_INSTALL_ROOT   default /. Any other root stages the files only: no user, no systemctl (tests, images;
#                           the venv's scripts name their interpreter by its path under that root).
#   FIREZONE_NO_START       true: install and enable, but do not (re)start the service.
#   FIREZONE_PYTHON         interpreter for the venv (default python3, >= 3.11 with the venv module).
#   FIREZONE_PIP_ARGS       extra pip arguments, e.g. "--no-index --find-links /srv/wheels" for an offline install.
set -euo pipefail
# Everything installed is readable by the service user, whatever the caller's umask.
umask 022

readonly UNIT_NAME=firezone-gateway.service
readonly SERVICE_USER=firezone
readonly GATEWAY_SETTINGS=(
    FIREZONE_ID FIREZONE_NAME FIREZONE_API_URL FIREZONE_LOG_FORMAT FIREZONE_LOG_LEVEL RUST_LOG FIREZONE_FLOW_LOGS
    FIREZONE_MAX_PARTITION_TIME FIREZONE_NO_INC_BUF FIREZONE_NUM_TUN_THREADS FIREZONE_NO_TELEMETRY
    FIREZONE_NO_HOST_SETUP HEALTH_CHECK_ADDR
)

fail() {
    echo "install-gateway: $*" >&2
    exit 1
}

root="${FIREZONE_INSTALL_ROOT:-/}"
root="${root%/}"
staging_only=false
[[ -n "$root" ]] && staging_only=true
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
unit_source="$script_dir/$UNIT_NAME"

config_dir="$root/etc/firezone"
token_file="$config_dir/gateway-token"
env_file="$config_dir/gateway-env"
venv_dir="$root/opt/firezone/venv"
unit_file="$root/etc/systemd/system/$UNIT_NAME"

[[ -f "$unit_source" ]] || fail "$UNIT_NAME must sit next to this script ($unit_source is missing)"
[[ -n "${FIREZONE_WHEEL:-}" ]] || fail "FIREZONE_WHEEL is required (path or https URL of the gateway wheel)"
[[ "${FIREZONE_WHEEL_SHA256:-}" =~ ^[0-9a-fA-F]{64}$ ]] || fail "FIREZONE_WHEEL_SHA256 must be 64 hex characters"
if [[ -z "${FIREZONE_TOKEN:-}" && ! -s "$token_file" ]]; then
    fail "FIREZONE_TOKEN is required (or an existing $token_file)"
fi
if [[ "$staging_only" == false && "$(id -u)" -ne 0 ]]; then
    fail "run as root"
fi

for unused in OTLP_GRPC_ENDPOINT GOOGLE_CLOUD_PROJECT_ID FIREZONE_OTLP_GRPC_ENDPOINT FIREZONE_GOOGLE_CLOUD_PROJECT_ID; do
    if [[ -n "${!unused:-}" ]]; then
        echo "install-gateway: $unused is accepted for compatibility and not used (this gateway exports no OTLP)"
    fi
done

work_dir="$(mktemp -d)"
trap 'rm -rf "$work_dir"' EXIT

# 1. The wheel, verified before pip sees it. pip needs the wheel's own file name.
wheel_name="$(basename "${FIREZONE_WHEEL%%\?*}")"
[[ "$wheel_name" == *.whl ]] || fail "FIREZONE_WHEEL must name a .whl file, got $wheel_name"
wheel="$work_dir/$wheel_name"
case "$FIREZONE_WHEEL" in
    https://*) curl --proto '=https' --tlsv1.2 -fsSL --retry 5 -o "$wheel" "$FIREZONE_WHEEL" ;;
    *://*) fail "FIREZONE_WHEEL must be a local path or an https URL" ;;
    *) cp -- "$FIREZONE_WHEEL" "$wheel" ;;
esac
actual_sha256="$(sha256sum "$wheel" | cut -d' ' -f1)"
if [[ "$actual_sha256" != "${FIREZONE_WHEEL_SHA256,,}" ]]; then
    fail "checksum mismatch for $wheel_name: expected ${FIREZONE_WHEEL_SHA256,,}, got $actual_sha256"
fi

# 2. The gateway in a venv of its own per wheel, under /opt/firezone/releases/<checksum>; /opt/firezone/venv is a
# symlink swapped in one rename once the venv is complete, so a failed upgrade leaves the running version in place.
# (A venv records its own path, so it is built where it will live.)
python="${FIREZONE_PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fail "$python is not Python >= 3.11"
release_dir="$root/opt/firezone/releases/$actual_sha256"
mkdir -p "$root/opt/firezone/releases"
# The same wheel again (a re-run to change settings) keeps its complete venv: the running service is not disturbed.
if [[ ! -f "$release_dir/.installed" ]]; then
    rm -rf "$release_dir"
    "$python" -m venv "$release_dir"
    # shellcheck disable=SC2086 # FIREZONE_PIP_ARGS is a list of arguments on purpose
    "$release_dir/bin/python" -m pip install --quiet --disable-pip-version-check --no-input ${FIREZONE_PIP_ARGS:-} \
        "$wheel"
    [[ -x "$release_dir/bin/firezone-gateway" ]] || fail "the wheel installed no firezone-gateway command"
    echo "$wheel_name" >"$release_dir/.installed"
fi
ln -sfn "releases/$actual_sha256" "$root/opt/firezone/venv.new"
mv -T "$root/opt/firezone/venv.new" "$venv_dir"
for old in "$root"/opt/firezone/releases/*; do
    [[ "$old" == "$release_dir" ]] || rm -rf "$old"
done

# 3. Configuration: the token as a root-only credential file, the settings as an environment file.
mkdir -p "$config_dir"
chmod 0755 "$config_dir"
umask 077
if [[ -n "${FIREZONE_TOKEN:-}" ]]; then
    printf '%s\n' "$FIREZONE_TOKEN" >"$token_file.new"
    chmod 0400 "$token_file.new"
    mv -f "$token_file.new" "$token_file"
fi
if [[ -z "${FIREZONE_ID:-}" && -f "$env_file" ]]; then
    FIREZONE_ID="$(sed -n 's/^FIREZONE_ID="\([0-9A-Za-z_-]*\)"$/\1/p' "$env_file" | tail -n 1)"
fi
if [[ -z "${FIREZONE_ID:-}" ]]; then
    # A unique id per machine even when many are cloned from one image (docs/protocol.md §6.2).
    FIREZONE_ID="$(head -c 32 /dev/urandom | sha256sum | cut -d' ' -f1)"
fi
{
    echo "# Written by install-gateway.sh; read by $UNIT_NAME. The token is not here: see gateway-token."
    for name in "${GATEWAY_SETTINGS[@]}"; do
        value="${!name:-}"
        [[ -n "$value" ]] || continue
        [[ "$value" != *$'\n'* ]] || fail "$name must be a single line"
        # systemd EnvironmentFile= syntax (shell's too): double quotes, with \ " $ ` escaped.
        value="${value//\\/\\\\}"
        value="${value//\"/\\\"}"
        value="${value//\$/\\\$}"
        value="${value//\`/\\\`}"
        printf '%s="%s"\n' "$name" "$value"
    done
} >"$env_file.new"
chmod 0600 "$env_file.new"
mv -f "$env_file.new" "$env_file"
umask 022

# 4. The unit.
mkdir -p "$(dirname "$unit_file")"
install -m 0644 "$unit_source" "$unit_file"

if [[ "$staging_only" == true ]]; then
    echo "install-gateway: staged under $root (no user created, no service started)"
    exit 0
fi

# 5. The service user, then systemd.
getent group "$SERVICE_USER" >/dev/null || groupadd --system "$SERVICE_USER"
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --gid "$SERVICE_USER" --home-dir /var/lib/firezone --no-create-home \
        --shell /usr/sbin/nologin "$SERVICE_USER"
fi
systemctl daemon-reload
systemctl enable "$UNIT_NAME"
if [[ "${FIREZONE_NO_START:-false}" != true ]]; then
    systemctl restart "$UNIT_NAME"
fi
echo "install-gateway: $UNIT_NAME installed (id $FIREZONE_ID)"
