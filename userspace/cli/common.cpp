#include <fmt/core.h>

#include <iostream>
#include <sstream>

#include "cli/cli.hpp"

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
    fmt::print(stderr, "hotfix-ctl {}: {}; usage: hotfix-ctl {} {} (see --help)\n", verb, e.what(), verb, synopsis);
    return 2;
  }
  return std::nullopt;
}

int report(const Error& e) {
  fmt::print(stderr, "hotfix-ctl: {}\n", e.line());
  return e.exit_code;
}

}  // namespace hotfix::cli
