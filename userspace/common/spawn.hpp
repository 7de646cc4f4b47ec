// Running a helper program (dpkg-query, the compiler) and reading what it prints.
#pragma once
#include <string>
#include <vector>

namespace hotfix {

struct Captured {
  bool exited_zero = false;  // it ran and exited with status 0
  std::string out;           // its stdout ("" when it could not be started); stderr is dropped
};

// Run argv[0] (searched in PATH) with argv, wait for it, and return its stdout.
Captured spawn__capture(const std::vector<std::string>& argv);

}  // namespace hotfix
