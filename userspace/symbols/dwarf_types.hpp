// Signatures and type layouts from DWARF, compared between two objects (the target and a fix
// library): what a replacement must agree on with the code that calls it and with the data
// it shares. Only the compilation units asked for are read (a CU by address through the
// aranges, dwarf_addrdie), and within them only the types reached from what is compared.
#pragma once
#include <elfutils/libdw.h>

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace hotfix {

// The CUs of one Dwarf that were read, indexed by qualified name ("pricing::order").
class DwarfIndex {
 public:
  explicit DwarfIndex(Dwarf* dwarf) : dwarf_(dwarf) {}
  Dwarf* dwarf() const { return dwarf_; }

  // The DW_TAG_subprogram whose code starts at `address` (a DWARF address); its CU is read.
  std::optional<Dwarf_Die> subprogram_at(uint64_t address);
  // Read every CU (a fix library is small).
  void read_all();
  // The definition of the variable `qualified` in the CUs read, if any.
  std::optional<Dwarf_Die> variable(const std::string& qualified) const;
  // Variables the CUs read declare without defining (`extern struct order g_last;`).
  std::vector<std::pair<std::string, Dwarf_Die>> declared_variables() const;
  // A complete definition for `type` (itself unless it is a declaration: DW_AT_declaration),
  // by tag and qualified name in the CUs read.
  std::optional<Dwarf_Die> definition(Dwarf_Die type) const;
  // "pricing::order" for a DIE of a CU read; its DW_AT_name otherwise ("" when unnamed).
  std::string qualified_name(Dwarf_Die die) const;

 private:
  std::optional<Dwarf_Die> cu_at(uint64_t address) const;
  void read_cu(Dwarf_Die cu);
  void index_children(Dwarf_Die parent, const std::string& scope);
  void index_die(Dwarf_Die& die, const std::string& scope);

  Dwarf* dwarf_;
  std::set<uint64_t> cus_;                       // offsets of the CUs read
  std::map<uint64_t, std::string> names_;        // DIE offset -> qualified name (types, variables)
  std::map<std::string, Dwarf_Die> types_;       // "<tag>:<qualified>" -> complete definition
  std::map<std::string, Dwarf_Die> variables_;   // qualified -> definition
  std::vector<std::pair<std::string, Dwarf_Die>> declared_;  // extern declarations
  std::vector<Dwarf_Die> subprograms_;           // definitions with code, of the CUs read
};

// The source language of the CU holding `die`, when it is not C or C++ ("Go", "Rust", ...);
// empty for C and C++. Types of other languages are not compared with a C or C++ fix.
std::string dwarf__foreign_language(Dwarf_Die die);

// The first difference between two DIEs, as a sentence for an error.
struct TypeDifference {
  std::string text;
};

// Compares the target's side (`target`) with fix.so's (`fix`). Each call reports the first
// difference it finds, or nothing; types already compared are not compared again (and
// recursive types end).
class TypeComparer {
 public:
  TypeComparer(const DwarfIndex& target, const DwarfIndex& fix) : target_(target), fix_(fix) {}

  // Return type, parameter count, each parameter's size and class, and the types they reach.
  std::optional<TypeDifference> signatures(Dwarf_Die target, Dwarf_Die fix, const std::string& function);
  // The types of one variable the fix shares with the target.
  std::optional<TypeDifference> variables(Dwarf_Die target, Dwarf_Die fix, const std::string& variable);

  size_t types_compared() const { return compared_.size(); }
  // Types reached that one side only declares (their definition is in no CU read): not compared.
  const std::set<std::string>& not_compared() const { return not_compared_; }

 private:
  struct Side;
  std::optional<TypeDifference> value(const Side& t, const Side& f, const std::string& what);
  std::optional<TypeDifference> pointee(const Side& t, const Side& f, const std::string& what, int depth);
  std::optional<TypeDifference> layout(const Side& t, const Side& f, int depth);
  std::optional<TypeDifference> same(const Side& t, const Side& f, const std::string& what, int depth);
  std::optional<TypeDifference> aggregate(Dwarf_Die t, Dwarf_Die f, int depth);
  std::optional<TypeDifference> members(Dwarf_Die t, Dwarf_Die f, const std::string& name, int depth);
  std::optional<TypeDifference> bases(Dwarf_Die t, Dwarf_Die f, const std::string& name, int depth);
  std::optional<TypeDifference> virtuals(Dwarf_Die t, Dwarf_Die f, const std::string& name);
  std::optional<TypeDifference> enumeration(Dwarf_Die t, Dwarf_Die f);
  std::optional<TypeDifference> parameters(Dwarf_Die t, Dwarf_Die f, const std::string& function, int depth);
  std::string type_name(const DwarfIndex& index, Dwarf_Die* die) const;

  const DwarfIndex& target_;
  const DwarfIndex& fix_;
  std::set<std::pair<uint64_t, uint64_t>> visited_;  // (target DIE, fix DIE) offsets
  std::set<uint64_t> compared_;                      // target aggregate and enum DIEs
  std::set<std::string> not_compared_;
};

}  // namespace hotfix
