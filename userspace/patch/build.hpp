// `hotfix-ctl build`: compile a fix the way the target object was compiled, and stamp it for
// that object's build. The flags come from the target's DW_AT_producer (symbols/producer.hpp):
// its language standard, -O, -m*, -f*, --param and defines, minus what makes no sense for a
// shared object loaded beside it; then `-shared -fPIC -g`. tools/HotfixPatch.cmake asks for
// the same selection (`build --dry-run --json`), so a CMake build gets the same flags.
#pragma once
#include <sys/types.h>

#include <string>
#include <utility>
#include <vector>

#include "common/error.hpp"
#include "symbols/producer.hpp"

namespace hotfix {

struct BuildOptions {
  pid_t pid = 0;                    // --pid: an object mapped in this process ...
  std::string object;               // ... --object NAME (default: its executable)
  std::string binary;               // --binary PATH: an ELF file on disk instead
  std::string output;               // -o fix.so
  std::vector<std::string> sources;
  std::vector<std::string> extra;   // after `--`: appended last, so they win
  std::string compiler;             // --compiler: instead of the one the producer names
  std::string stamp_source;         // where to write the stamp source ("": a temporary directory)
};

// What the flags of the target's producer became.
struct FlagChoice {
  std::vector<std::string> kept;
  std::vector<std::pair<std::string, std::string>> dropped;  // flag, why
};
// The shared flag filter: `producer`'s switches that a fix in `language` should be compiled with.
FlagChoice build__select_flags(const Producer& producer, SourceLanguage language);

struct BuildPlan {
  std::string object;    // the target object (as mapped, or as given)
  std::string build_id;  // "" when it has none (then nothing is stamped)
  SourceLanguage language = SourceLanguage::c;  // of the sources (C++ if any is C++)
  std::string producer;  // the DW_AT_producer the flags come from; "" when missing
  FlagChoice flags;
  std::string compiler;
  std::string output;
  std::string stamp_source;  // the generated stamp file ("" when not stamped)
  std::string temp_dir;      // removed after build__run
  std::vector<std::string> command;  // argv of the compiler run
  std::vector<std::string> notes;    // "no DW_AT_producer for ...; building with plain defaults", ...
};

// Resolve the target object, read its producer, choose compiler and flags, and write the stamp
// source. Nothing is compiled.
Result<BuildPlan> build__plan(const BuildOptions& opts);
// Run the plan's command (the compiler's output goes to our stdout/stderr) and check that the
// output carries the stamp. Removes the temporary stamp source.
Result<void> build__run(const BuildPlan& plan);
// Remove what build__plan wrote to a temporary directory (a dry run keeps it: the printed
// command needs it).
void build__cleanup(const BuildPlan& plan);
// The chosen flags (without -shared -fPIC -g) as a compiler response file (`cc @FILE`): what
// tools/HotfixPatch.cmake compiles with.
Result<void> build__write_flags_file(const BuildPlan& plan, const std::string& path);
// The command as one shell line (arguments quoted where needed).
std::string build__command_line(const BuildPlan& plan);

// C or C++ by extension (.c: C; .cc .cpp .cxx .c++ .C: C++); unknown otherwise.
SourceLanguage build__language_of(const std::string& source);

}  // namespace hotfix
