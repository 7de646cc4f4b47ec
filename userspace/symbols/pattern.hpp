// The pattern language every verb shares: exact names (demangled, mangled, or with
// a parameter list to pick an overload), globs (`pricing::*`, `Order::*`, `*parse*`),
// and an optional --object filter.
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "common/error.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

// How a pattern compares (see symbols__select):
//  - exact: the mangled name, or the base name (demangled, without return type, parameter
//    list and cv/ref qualifiers: "Order::total() const" -> "Order::total"), so it matches
//    every overload; with a parameter list ("Order::add(int)") only that signature
//    (spaces are not significant; trailing qualifiers may be left out).
//  - glob (`*`, `?`): against the base name; also against the signature when the glob has a
//    '(' and against the mangled name when it starts with "_Z" or "_R" (parameter types inside
//    those would otherwise make `*parse*` select every function taking a Parser).
//  - Rust (legacy and v0): the path without its hash, as rustfilt shows it
//    ("main::pricing::discount"), also without the crate ("pricing::discount", so
//    `pricing::*` works), an inherent method as a path ("main::pricing::Order::total" for
//    "<main::pricing::Order>::total"), a generic instance without its arguments; and the
//    legacy path with its hash ("...::h5702c7547b8d1236").
//  Aliases (other names at the function's address) count too.
//  Clones keep their suffix in the base name ("f [clone .cold]"): `f` never selects them.
struct Pattern {
  std::string text;
  static Pattern parse(std::string text) { return Pattern{std::move(text)}; }
  bool is_glob() const;
  bool matches(const Function& f) const;
};

struct SelectOptions {
  // Basename ("libfoo.so.1"), basename up to a '.' ("libfoo.so", "libfoo" match
  // "libfoo.so.1"), or full path; empty = every object.
  std::string object;
};

// A demangled name split the way patterns see it.
struct NameParts {
  std::string base;       // "max_of<int>" for "int max_of<int>(int, int)"
  std::string signature;  // "max_of<int>(int, int)": the name without the return type
};
NameParts symbols__split_name(std::string_view demangled);
inline std::string symbols__base_name(std::string_view demangled) { return symbols__split_name(demangled).base; }

// An identifier that the ELF spelling (mangled name or alias) of every function the exact
// pattern `pattern` selects holds, as a C name or a <length><identifier> part of a mangled
// one: its last identifier ("discount" for "pricing::discount(double)"). Empty when there is
// none to rely on: globs, operators, std's abbreviated names, non-ASCII names.
std::string symbols__pattern_needle(std::string_view pattern);

// Does the object at `path` answer to `wanted` (see SelectOptions::object)?
bool symbols__object_matches(const std::string& path, const std::string& wanted);

// The functions matching any of `patterns` (in address order, each once).
// A pattern that matches nothing is an error whose hint suggests the nearest names.
Result<std::vector<Function>> symbols__select(const SymbolTable& table,
                                              const std::vector<std::string>& patterns,
                                              const SelectOptions& opts = {});

// Up to `max` names of `table` nearest to `wanted` (for "did you mean").
std::vector<std::string> symbols__nearest(const SymbolTable& table, const std::string& wanted, size_t max = 3);

}  // namespace hotfix
