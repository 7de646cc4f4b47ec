// Before anything touches the target: will the target's own dynamic loader be able to load
// fix.so? dlopen runs fix.so's constructors inside the target's loader lock, and a failure
// there (an undefined symbol, a missing dependency) is only reported after the loader has
// started changing the target, so everything that can be checked from outside is checked here
// (patch__prepare calls it: --dry-run runs it too).
//   - every DT_NEEDED dependency of fix.so (and theirs) exists as the target would find it:
//     already loaded, or in RPATH/RUNPATH, LD_LIBRARY_PATH of the target, its ld.so.cache or
//     the default directories, all inside the target's root (/proc/PID/root);
//   - every undefined, non-weak symbol of fix.so is bound by the binder (binder.hpp) or
//     defined in the .dynsym of an object the target has loaded or fix.so's dependencies.
#pragma once
#include <sys/types.h>

#include <string>

#include "common/error.hpp"
#include "patch/fixlib.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

struct PreflightInput {
  pid_t pid = 0;
  const SymbolTable* table = nullptr;  // the target's symbols (SymbolTable::for_pid)
  std::string executable;              // the target's main executable
  std::string library;                 // fix.so as given (validated by fixlib__validate)
  std::string loaded_from_dir;         // where the bound copy is dlopen'ed from ($ORIGIN)
  const FixImage* image = nullptr;     // fix.so's bytes as read once (fixlib__load): what is bound and loaded
};

// One error naming the first dependency or symbol the target's loader would not find.
Result<void> preflight__check(const PreflightInput& in);

}  // namespace hotfix
