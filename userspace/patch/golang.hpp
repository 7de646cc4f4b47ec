// Go code is not patched: a Go function does not follow the C ABI that a fix.so is written to
// (Go's internal register ABI passes arguments in other registers and keeps the goroutine in
// r14), and goroutines run on stacks the runtime allocates and moves, which the stack scan
// that proves no thread is inside the old code cannot see. Measured: a C replacement of a Go
// HTTP handler was applied silently and the server answered garbage.
#pragma once
#include <vector>

#include "common/error.hpp"

namespace hotfix {

struct PlanEntry;

// Refuses (exit 1, nothing changed) when a planned target lives in a Go object (a Go program,
// or a Go c-shared library: observe/probe_safety.hpp's probe__is_go_object).
Result<void> golang__check(const std::vector<PlanEntry>& entries);

}  // namespace hotfix
