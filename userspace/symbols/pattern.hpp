// The pattern language every verb shares: exact names (demangled, mangled, or with
// a parameter list to pick an overload), globs (`pricing::*`, `Order::*`, `*parse*`),
// and an optional --object filter.
#pragma once
#include <string>
#include <vector>

#include "common/error.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

struct Pattern {
  std::string text;
  static Pattern parse(std::string text) { return Pattern{std::move(text)}; }
  bool matches(const Function& f) const;
};

struct SelectOptions {
  std::string object;        // basename or path; empty = every object
};

// The functions matching any of `patterns` (in address order, each once).
// A pattern that matches nothing is an error whose hint suggests the nearest names.
Result<std::vector<Function>> symbols__select(const SymbolTable& table,
                                              const std::vector<std::string>& patterns,
                                              const SelectOptions& opts = {});

// Up to `max` names of `table` nearest to `wanted` (for "did you mean").
std::vector<std::string> symbols__nearest(const SymbolTable& table, const std::string& wanted, size_t max = 3);

}  // namespace hotfix
