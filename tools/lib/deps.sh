# Shared by tools/check, tools/demo and tools/bench: install the Debian packages hotfix needs.
HOTFIX_DEPS=(cmake g++ clang llvm pkg-config make libbpf-dev bpftool libelf-dev libdw-dev
             libcapstone-dev libfmt-dev libboost-program-options-dev catch2 linux-libc-dev
             binutils xz-utils libiberty-dev
             # the .deb: CPack's Depends (dpkg-shlibdeps), its lint, the man page check
             dpkg-dev file lintian man-db
             # Rust fixtures (tests skip without it)
             rustc
             # tests/realworld: Debian's own programs, driven by their own clients on loopback
             redis-server redis-tools nginx-light curl python3 libsqlite3-0 zlib1g golang-go procps util-linux
             memcached libmemcached-tools
             # tools/bench: bpftrace beside watch in the per-call cost table
             bpftrace
             # tests/test_fleet: the Ansible role run on localhost, its YAML and the DaemonSet's linted
             ansible-core yamllint)

hotfix_install_deps() {
  local missing=()
  for p in "${HOTFIX_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Daemons among them (redis-server, nginx, memcached) must not be started by their postinst: the
    # tests start their own on loopback. policy-rc.d is Debian's switch for that.
    local policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
    fi
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  fi
}
