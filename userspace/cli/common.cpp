#include <fmt/core.h>

#include <iostream>
#include <sstream>

#include "cli/cli.hpp"
#include "process/environment.hpp"

namespace hotfix::cli {

std::optional<int> parse(const std::string& verb, const Args& args, const po::options_description& desc,
                         const char* positional, po::variables_map& vm, const std::string& synopsis) {
  po::options_description all;
  all.add(desc).add_options()("help,h", "show this help");
  po::positional_options_description pos;
  if (positional) pos.add(positional, -1);
  try {
    po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
    if (vm.count("help")) {
      std::ostringstream text;
      text << all;
      fmt::print("usage: hotfix-ctl {} {}\n\n{}", verb, synopsis, text.str());
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    fmt::print(stderr, "hotfix-ctl {}: {}; usage: hotfix-ctl {} {} (see --help)\n", verb, one_line(e.what()), verb,
               synopsis);
    return 2;
  }
  // Every verb that takes --pid gets the same answer for a pid that names no user process
  // (a thread id, a kernel thread, ourselves, <= 0) before it reads or attaches anything.
  if (vm.count("pid")) {
    pid_t pid = 0;
    try {
      pid = vm["pid"].as<pid_t>();
    } catch (const boost::bad_any_cast&) {
      return 2;
    }
    if (auto ok = target__check_pid(pid); !ok) return report(ok.error());
  }
  return std::nullopt;
}

std::string one_line(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += static_cast<char>(c);
  }
  return out;
}

int report(const Error& e) {
  fmt::print(stderr, "hotfix-ctl: {}\n", one_line(e.line()));
  return e.exit_code;
}

}  // namespace hotfix::cli
