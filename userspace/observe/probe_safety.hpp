// Where a uprobe must not go. Both rules protect the target from being crashed by our probes.
//
// 1. The kernel executes a probed instruction out of line from the FILE's bytes, not the
//    process's. Where the process's entry differs from the file (a hotfix jump, another
//    patcher), a probe would run the file's instruction and resume inside the new bytes.
// 2. A return probe replaces the return address with a kernel trampoline that has no unwind
//    information: a C++ exception unwinding through a probed frame ends in std::terminate.
// 3. Go code must never get a return probe: the Go runtime copies goroutine stacks when they
//    grow and walks them for the GC and for tracebacks; a return address that points into the
//    kernel's uretprobe trampoline is an "unknown pc" to it, and the program dies (SIGILL or a
//    fatal traceback) within a second under load. Unlike rule 2 there is no override.
#pragma once
#include <sys/types.h>

#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

// An error naming the first function whose entry in `pid` no longer matches its file (other
// than by breakpoints: another uprobe on the entry or on an instruction after it is safe).
Result<void> probe__check_entries(pid_t pid, const std::vector<Function>& functions);

// Up to `n` bytes of `fn`'s file at its entry, read where `pid` sees the file (its mount
// namespace); nullopt when they cannot be read.
std::optional<std::vector<uint8_t>> probe__file_bytes(pid_t pid, const Function& fn, size_t n);

// Where the live bytes differ from the file's only by breakpoints (someone else's uprobes,
// bpftrace, a debugger): the offset of the first one; nullopt when they are equal or differ
// otherwise (a patch). Writing over such a byte loses that tool's probe, and its removal
// would later put the file's byte back into what was written there.
std::optional<size_t> probe__breakpoint_offset(std::span<const uint8_t> live, std::span<const uint8_t> file);

// Objects among `functions` that hold C++ exception tables (.gcc_except_table): an exception
// may unwind through their frames, so return probes there are unsafe.
std::vector<std::string> probe__objects_with_exceptions(const std::vector<Function>& functions);

// Why return probes on an object's functions are dangerous, if they are.
enum class ReturnProbeRisk {
  none,
  cxx_exceptions,  // .gcc_except_table: an exception unwinding through one terminates (callers may override)
  go,              // a Go program or library (.go.buildinfo / runtime.buildVersion): never
};
// The risk of return probes in `object` (a path as in Function::object). Cached per path.
ReturnProbeRisk probe__return_risk(const std::string& object);

// Whether `object` is Go code: it has a .go.buildinfo section or a runtime.buildVersion symbol.
bool probe__is_go_object(const std::string& object);

// The Go objects among `functions`, each named once.
std::vector<std::string> probe__go_objects(const std::vector<Function>& functions);

}  // namespace hotfix
