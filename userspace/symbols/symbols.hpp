// Functions of a running process (or of one ELF file), from .symtab/.dynsym and
// separate debug files, read with elfutils.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

enum class Binding { global, weak, local };
const char* binding__name(Binding b);

struct Function {
  std::string name;                  // demangled (C++), or the plain C name
  std::string mangled;               // the symbol as in the ELF file (== name for C)
  std::vector<std::string> aliases;  // other symbol names at the same address
  std::string object;                // path of the ELF object (as mapped)
  uint64_t address = 0;              // runtime address in the target (0 for a file not loaded)
  uint64_t offset = 0;               // file offset of the entry: what uprobes need
  uint64_t size = 0;
  Binding binding = Binding::global;
};

struct ObjectInfo {
  std::string path;        // as in /proc/PID/maps
  uint64_t load_bias = 0;  // runtime address = st_value + load_bias
  std::string build_id;    // hex, may be empty
  std::string debug_file;  // separate debug file used, if any
  size_t function_count = 0;
};

class SymbolTable {
 public:
  // Every mapped ELF object of `pid`: the executable and its shared libraries.
  static Result<SymbolTable> for_pid(pid_t pid);
  // One ELF file on disk, not loaded anywhere (addresses are st_value, load_bias 0).
  static Result<SymbolTable> for_file(const std::string& path);

  const std::vector<Function>& functions() const { return functions_; }
  const std::vector<ObjectInfo>& objects() const { return objects_; }
  // The function containing `addr` (runtime address), or nullptr.
  const Function* function_at(uint64_t addr) const;

 private:
  std::vector<Function> functions_;  // sorted by address
  std::vector<ObjectInfo> objects_;
  friend struct SymbolTableBuilder;
};

}  // namespace hotfix
