# Sourced by the scripts: installs the Debian packages behind the given commands when they are
# missing (as root, with apt-get), or says exactly what to install and stops.
#   need cmd=package [cmd=package ...]
need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
  done
  ((${#missing[@]})) || return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    printf '==> installing: %s\n' "${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing packages: ${missing[*]} — install them (apt-get install ${missing[*]}) and rerun" >&2
    exit 1
  fi
}
