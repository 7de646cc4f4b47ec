# Shared by tools/check, tools/demo and tools/bench: install the Debian packages hotfix needs.
HOTFIX_DEPS=(cmake g++ clang llvm pkg-config make libbpf-dev bpftool libelf-dev libdw-dev
             libcapstone-dev libfmt-dev libboost-program-options-dev catch2 linux-libc-dev
             binutils xz-utils)

hotfix_install_deps() {
  local missing=()
  for p in "${HOTFIX_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
