// hotfix-ctl --version: what this build is, what it was built with, and what this kernel
// offers -- the first lines a bug report needs.
#include <boost/version.hpp>
#include <bpf/libbpf.h>
#include <capstone/capstone.h>
#include <elfutils/libdwfl.h>
#include <fmt/core.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "cli/cli.hpp"
#include "cli/describe.hpp"
#include "observe/uprobe_multi.hpp"

#ifndef HOTFIX_VERSION
#define HOTFIX_VERSION "unknown"
#endif
#ifndef HOTFIX_GIT_DESCRIBE
#define HOTFIX_GIT_DESCRIBE "unknown"
#endif
#ifndef HOTFIX_BUILT_WITH
#define HOTFIX_BUILT_WITH "unknown"
#endif

namespace hotfix::cli {

int print_version() {
  fmt::print("hotfix-ctl {} (git {})\n", HOTFIX_VERSION, HOTFIX_GIT_DESCRIBE);
  fmt::print("built with: {}, Boost {}.{}, fmt {}.{}.{}\n", HOTFIX_BUILT_WITH, BOOST_VERSION / 100000,
             BOOST_VERSION / 100 % 1000, FMT_VERSION / 10000, FMT_VERSION / 100 % 100, FMT_VERSION % 100);
  int cs_major = 0, cs_minor = 0;
  cs_version(&cs_major, &cs_minor);
  fmt::print("running with: libbpf {}, elfutils {}, Capstone {}.{}\n", libbpf_version_string(), dwfl_version(nullptr),
             cs_major, cs_minor);
  struct utsname u {};
  ::uname(&u);
  // uprobe_multi is asked the way watch and patch ask it (a real link); without root or BPF
  // that cannot be answered, and saying why is more useful than guessing.
  std::string multi;
  if (auto available = uprobe_multi__available(); available) multi = *available ? "yes" : "no (perf uprobes are used)";
  else multi = fmt::format("unknown ({})", one_line(available.error().what));
  bool btf = ::access("/sys/kernel/btf/vmlinux", R_OK) == 0;
  fmt::print("kernel {}: uprobe_multi {}, BTF {}\n", u.release, multi,
             btf ? "yes (/sys/kernel/btf/vmlinux)" : "no (/sys/kernel/btf/vmlinux is missing)");
  return 0;
}

int print_man(const std::string& template_path, const std::vector<VerbDoc>& verbs) {
  std::ifstream in(template_path);
  if (!in) {
    fmt::print(stderr, "hotfix-ctl: cannot read the man page template {}\n", template_path);
    return 1;
  }
  std::string out;
  for (std::string line; std::getline(in, line);) {
    if (line == "@VERBS@") {
      out += describe__man(verbs);
      continue;
    }
    for (size_t at; (at = line.find("@VERSION@")) != std::string::npos;) line.replace(at, 9, HOTFIX_VERSION);
    out += line + "\n";
  }
  fmt::print("{}", out);
  return 0;
}

}  // namespace hotfix::cli
