#include "symbols/dwarf_types.hpp"

#include <dwarf.h>
#include <fmt/format.h>

#include <algorithm>

namespace hotfix {

namespace {

constexpr int kMaxDepth = 24;  // deeper nesting is not compared (and ends any cycle the visited set misses)

uint64_t offset_of(Dwarf_Die die) { return dwarf_dieoffset(&die); }

std::string name_of(Dwarf_Die die) {
  const char* n = dwarf_diename(&die);
  return n ? n : "";
}

bool flag_of(Dwarf_Die die, int attribute) {
  Dwarf_Attribute a;
  bool on = false;
  return dwarf_attr_integrate(&die, attribute, &a) && dwarf_formflag(&a, &on) == 0 && on;
}

std::optional<Dwarf_Die> ref_of(Dwarf_Die die, int attribute) {
  Dwarf_Attribute a;
  Dwarf_Die out;
  if (!dwarf_attr_integrate(&die, attribute, &a) || !dwarf_formref_die(&a, &out)) return std::nullopt;
  return out;
}

std::optional<Dwarf_Die> type_of(Dwarf_Die die) { return ref_of(die, DW_AT_type); }

std::optional<int64_t> sdata_of(Dwarf_Die die, int attribute) {
  Dwarf_Attribute a;
  Dwarf_Sword v = 0;
  if (!dwarf_attr_integrate(&die, attribute, &a) || dwarf_formsdata(&a, &v) != 0) return std::nullopt;
  return v;
}

std::optional<uint64_t> udata_of(Dwarf_Die die, int attribute) {
  Dwarf_Attribute a;
  Dwarf_Word v = 0;
  if (!dwarf_attr_integrate(&die, attribute, &a)) return std::nullopt;
  if (dwarf_formudata(&a, &v) == 0) return v;
  Dwarf_Op* ops = nullptr;  // DWARF 2 style: DW_OP_plus_uconst N, DW_OP_constu N
  size_t n = 0;
  if (dwarf_getlocation(&a, &ops, &n) == 0 && n == 1 && (ops[0].atom == DW_OP_plus_uconst || ops[0].atom == DW_OP_constu))
    return ops[0].number;
  return std::nullopt;
}

template <typename Fn>
void for_children(Dwarf_Die parent, Fn&& fn) {
  Dwarf_Die child;
  if (dwarf_child(&parent, &child) != 0) return;
  do fn(child);
  while (dwarf_siblingof(&child, &child) == 0);
}

bool is_qualifier(int tag) {
  return tag == DW_TAG_typedef || tag == DW_TAG_const_type || tag == DW_TAG_volatile_type ||
         tag == DW_TAG_restrict_type || tag == DW_TAG_atomic_type;
}

// Typedefs and cv-qualifiers resolved: what the ABI sees.
std::optional<Dwarf_Die> strip(std::optional<Dwarf_Die> die) {
  for (int i = 0; die && is_qualifier(dwarf_tag(&*die)) && i < kMaxDepth; i++) die = type_of(*die);
  return die;
}

bool is_record(int tag) { return tag == DW_TAG_structure_type || tag == DW_TAG_class_type || tag == DW_TAG_union_type; }
bool is_named_type(int tag) { return is_record(tag) || tag == DW_TAG_enumeration_type; }

// The ABI's classes of a value (x86-64 psABI terms, coarsely).
enum class Kind { none, integer, floating, pointer, aggregate, function, other };

Kind kind_of(const std::optional<Dwarf_Die>& die) {
  if (!die) return Kind::none;
  Dwarf_Die d = *die;
  switch (dwarf_tag(&d)) {
    case DW_TAG_base_type: {
      auto enc = udata_of(d, DW_AT_encoding).value_or(0);
      return enc == DW_ATE_float || enc == DW_ATE_complex_float ? Kind::floating : Kind::integer;
    }
    case DW_TAG_enumeration_type: return Kind::integer;
    case DW_TAG_pointer_type:
    case DW_TAG_reference_type:
    case DW_TAG_rvalue_reference_type:
    case DW_TAG_ptr_to_member_type:
    case DW_TAG_unspecified_type: return Kind::pointer;  // std::nullptr_t
    case DW_TAG_structure_type:
    case DW_TAG_class_type:
    case DW_TAG_union_type:
    case DW_TAG_array_type: return Kind::aggregate;
    case DW_TAG_subroutine_type: return Kind::function;
    default: return Kind::other;
  }
}

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::none: return "void";
    case Kind::integer: return "integer";
    case Kind::floating: return "floating point";
    case Kind::pointer: return "pointer";
    case Kind::aggregate: return "aggregate by value";
    case Kind::function: return "function";
    case Kind::other: return "other";
  }
  return "?";
}

std::optional<uint64_t> size_of(const std::optional<Dwarf_Die>& die) {
  if (!die) return 0;
  Dwarf_Die d = *die;
  Dwarf_Word size = 0;
  if (dwarf_aggregate_size(&d, &size) == 0) return size;
  if (kind_of(die) == Kind::pointer && dwarf_tag(&d) != DW_TAG_ptr_to_member_type) {
    Dwarf_Die cu;
    uint8_t address_size = 0;
    if (dwarf_diecu(&d, &cu, &address_size, nullptr)) return address_size;
  }
  return std::nullopt;  // a declaration only
}

const char* record_word(int tag) {
  switch (tag) {
    case DW_TAG_structure_type: return "struct";
    case DW_TAG_class_type: return "class";
    case DW_TAG_union_type: return "union";
    case DW_TAG_enumeration_type: return "enum";
  }
  return "type";
}

struct Member {
  std::string name;     // "(unnamed N)" for anonymous members
  int64_t bit_position = 0;
  uint64_t bit_size = 0;  // 0: not a bitfield
  Dwarf_Die die;
};

// Where a member starts, in bits from the start of its record (DWARF 4+ data_bit_offset, or
// DWARF 2/3 bit_offset counted from the storage unit's most significant bit).
int64_t bit_position_of(Dwarf_Die m, uint64_t bit_size) {
  if (auto bits = udata_of(m, DW_AT_data_bit_offset)) return static_cast<int64_t>(*bits);
  int64_t at = static_cast<int64_t>(udata_of(m, DW_AT_data_member_location).value_or(0)) * 8;
  auto old_style = udata_of(m, DW_AT_bit_offset);
  if (!old_style || !bit_size) return at;
  uint64_t storage = udata_of(m, DW_AT_byte_size).value_or(size_of(type_of(m)).value_or(0));
  return at + static_cast<int64_t>(storage * 8 - *old_style - bit_size);
}

// Data members in declaration order; static members and the vtable pointer are not data of
// an instance (the vtable is compared on its own).
std::vector<Member> members_of(Dwarf_Die record) {
  std::vector<Member> out;
  int unnamed = 0;
  for_children(record, [&](Dwarf_Die c) {
    if (dwarf_tag(&c) != DW_TAG_member || flag_of(c, DW_AT_declaration) || flag_of(c, DW_AT_external)) return;
    Member m;
    m.name = name_of(c);
    if (m.name.starts_with("_vptr")) return;
    if (m.name.empty()) m.name = fmt::format("(unnamed {})", ++unnamed);
    m.bit_size = udata_of(c, DW_AT_bit_size).value_or(0);
    m.bit_position = bit_position_of(c, m.bit_size);
    m.die = c;
    out.push_back(m);
  });
  return out;
}

const Member* member_named(const std::vector<Member>& list, const std::string& name) {
  for (auto& m : list)
    if (m.name == name) return &m;
  return nullptr;
}

std::string placement(const Member& m) {
  if (m.bit_size) return fmt::format("a {}-bit field at bit {}", m.bit_size, m.bit_position);
  return fmt::format("at offset {}", m.bit_position / 8);
}

struct Base {
  Dwarf_Die type;
  uint64_t offset = 0;
  bool is_virtual = false;
};

std::vector<Base> bases_of(Dwarf_Die record) {
  std::vector<Base> out;
  for_children(record, [&](Dwarf_Die c) {
    if (dwarf_tag(&c) != DW_TAG_inheritance) return;
    auto type = type_of(c);
    if (!type) return;
    out.push_back({*type, udata_of(c, DW_AT_data_member_location).value_or(0),
                   udata_of(c, DW_AT_virtuality).value_or(DW_VIRTUALITY_none) != DW_VIRTUALITY_none});
  });
  return out;
}

struct Virtual {
  std::string name;  // the method's name as written ("area")
  uint64_t slot = 0;
};

// The virtual methods a class declares (overrides included), in vtable order.
std::vector<Virtual> virtuals_of(Dwarf_Die record) {
  std::vector<Virtual> out;
  for_children(record, [&](Dwarf_Die c) {
    if (dwarf_tag(&c) != DW_TAG_subprogram) return;
    if (udata_of(c, DW_AT_virtuality).value_or(DW_VIRTUALITY_none) == DW_VIRTUALITY_none) return;
    out.push_back({name_of(c), udata_of(c, DW_AT_vtable_elem_location).value_or(~0ull)});
  });
  std::stable_sort(out.begin(), out.end(), [](const Virtual& a, const Virtual& b) { return a.slot < b.slot; });
  return out;
}

bool has_vptr_member(Dwarf_Die record) {
  bool found = false;
  for_children(record, [&](Dwarf_Die c) { found = found || (dwarf_tag(&c) == DW_TAG_member && name_of(c).starts_with("_vptr")); });
  return found;
}

bool has_vtable(const DwarfIndex& index, Dwarf_Die record, int depth = 0) {
  if (depth > kMaxDepth) return false;
  if (has_vptr_member(record) || !virtuals_of(record).empty()) return true;
  for (auto& b : bases_of(record))
    if (auto def = index.definition(b.type); def && has_vtable(index, *def, depth + 1)) return true;
  return false;
}

std::string slot_text(uint64_t slot) { return slot == ~0ull ? "an unknown slot" : fmt::format("slot {}", slot); }

struct Parameters {
  std::vector<Dwarf_Die> list;
  bool variadic = false;
};

// The parameters of a subprogram or subroutine type, as declared: from the last DIE of its
// chain (concrete copy -> abstract origin -> declaration) that lists any. The declaration is
// what callers were compiled against; an optimised copy may list fewer.
Parameters parameters_of(Dwarf_Die die) {
  std::optional<Dwarf_Die> at = die;
  Parameters found;
  for (int i = 0; at && i < 4; i++) {
    Parameters p;
    for_children(*at, [&](Dwarf_Die c) {
      if (dwarf_tag(&c) == DW_TAG_formal_parameter) p.list.push_back(c);
      if (dwarf_tag(&c) == DW_TAG_unspecified_parameters) p.variadic = true;
    });
    if (!p.list.empty() || p.variadic) found = std::move(p);
    auto origin = ref_of(*at, DW_AT_abstract_origin);
    at = origin ? origin : ref_of(*at, DW_AT_specification);
  }
  return found;
}

bool starts_at(Dwarf_Die die, uint64_t address) {
  Dwarf_Addr pc = 0;
  if (dwarf_entrypc(&die, &pc) == 0) return pc == address;
  Dwarf_Addr base = 0, start = 0, end = 0;
  for (ptrdiff_t off = 0; (off = dwarf_ranges(&die, off, &base, &start, &end)) > 0;)
    if (start == address) return true;
  return false;
}

}  // namespace

std::string dwarf__foreign_language(Dwarf_Die die) {
  Dwarf_Die cu;
  if (!dwarf_diecu(&die, &cu, nullptr, nullptr)) return "";
  switch (dwarf_srclang(&cu)) {
    case DW_LANG_C89:
    case DW_LANG_C:
    case DW_LANG_C99:
    case DW_LANG_C11:
    case DW_LANG_C_plus_plus:
    case DW_LANG_C_plus_plus_03:
    case DW_LANG_C_plus_plus_11:
    case DW_LANG_C_plus_plus_14:
    case -1: return "";  // no DW_AT_language: assume C
    case DW_LANG_Go: return "Go";
    case DW_LANG_Rust: return "Rust";
    case DW_LANG_Fortran77:
    case DW_LANG_Fortran90:
    case DW_LANG_Fortran95: return "Fortran";
    default: return fmt::format("DWARF language {:#x}", dwarf_srclang(&cu));
  }
}

// ---------------------------------------------------------------- the index

void DwarfIndex::read_cu(Dwarf_Die cu) {
  if (!cus_.insert(offset_of(cu)).second) return;
  index_children(cu, "");
}

void DwarfIndex::read_all() {
  Dwarf_Off off = 0, next = 0;
  size_t header = 0;
  while (dwarf_nextcu(dwarf_, off, &next, &header, nullptr, nullptr, nullptr) == 0) {
    Dwarf_Die cu;
    if (dwarf_offdie(dwarf_, off + header, &cu)) read_cu(cu);
    off = next;
  }
}

void DwarfIndex::index_children(Dwarf_Die parent, const std::string& scope) {
  for_children(parent, [&](Dwarf_Die c) { index_die(c, scope); });
}

void DwarfIndex::index_die(Dwarf_Die& die, const std::string& scope) {
  int tag = dwarf_tag(&die);
  std::string name = name_of(die);
  if (tag == DW_TAG_namespace) name = name.empty() ? "(anonymous namespace)" : name;
  std::string qualified = scope.empty() || name.empty() ? name : scope + "::" + name;
  if (auto spec = ref_of(die, DW_AT_specification)) qualified = qualified_name(*spec);
  if (tag == DW_TAG_namespace) return index_children(die, qualified);
  if (is_named_type(tag)) {
    names_[offset_of(die)] = qualified;
    if (!flag_of(die, DW_AT_declaration) && !qualified.empty())
      types_.emplace(fmt::format("{}:{}", tag == DW_TAG_class_type ? DW_TAG_structure_type : tag, qualified), die);
    if (is_record(tag)) index_children(die, qualified);  // nested types
  } else if (tag == DW_TAG_variable) {
    names_[offset_of(die)] = qualified;
    Dwarf_Attribute a;
    bool declaration = dwarf_attr(&die, DW_AT_declaration, &a) != nullptr;  // not integrated: a definition refers to one
    if (declaration) declared_.push_back({qualified, die});
    else variables_.emplace(qualified, die);
  } else if (tag == DW_TAG_subprogram) {
    Dwarf_Addr pc = 0;
    if (dwarf_entrypc(&die, &pc) == 0 || dwarf_hasattr(&die, DW_AT_ranges)) subprograms_.push_back(die);
  }
}

// The CU whose ranges hold `address`: by .debug_aranges, else (clang emits none by default)
// by the CUs' own DW_AT_ranges / low_pc, reading only their top DIEs.
std::optional<Dwarf_Die> DwarfIndex::cu_at(uint64_t address) const {
  Dwarf_Die cu;
  if (dwarf_addrdie(dwarf_, address, &cu)) return cu;
  Dwarf_Off off = 0, next = 0;
  size_t header = 0;
  for (; dwarf_nextcu(dwarf_, off, &next, &header, nullptr, nullptr, nullptr) == 0; off = next)
    if (dwarf_offdie(dwarf_, off + header, &cu) && dwarf_haspc(&cu, address) == 1) return cu;
  return std::nullopt;
}

std::optional<Dwarf_Die> DwarfIndex::subprogram_at(uint64_t address) {
  if (!dwarf_) return std::nullopt;
  auto cu = cu_at(address);
  if (!cu) return std::nullopt;
  read_cu(*cu);
  for (auto& s : subprograms_)
    if (starts_at(s, address)) return s;
  return std::nullopt;
}

std::optional<Dwarf_Die> DwarfIndex::variable(const std::string& qualified) const {
  auto it = variables_.find(qualified);
  if (it == variables_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::pair<std::string, Dwarf_Die>> DwarfIndex::declared_variables() const { return declared_; }

std::optional<Dwarf_Die> DwarfIndex::definition(Dwarf_Die type) const {
  if (!flag_of(type, DW_AT_declaration)) return type;
  int tag = dwarf_tag(&type);
  auto it = types_.find(fmt::format("{}:{}", tag == DW_TAG_class_type ? DW_TAG_structure_type : tag, qualified_name(type)));
  if (it == types_.end()) return std::nullopt;
  return it->second;
}

std::string DwarfIndex::qualified_name(Dwarf_Die die) const {
  auto it = names_.find(offset_of(die));
  return it != names_.end() ? it->second : name_of(die);
}

// ---------------------------------------------------------------- the comparison

struct TypeComparer::Side {
  const DwarfIndex& index;
  std::optional<Dwarf_Die> die;  // nullopt: void
};

std::string TypeComparer::type_name(const DwarfIndex& index, Dwarf_Die* die) const {
  if (!die) return "void";
  int tag = dwarf_tag(die);
  auto inner = [&]() {
    auto t = type_of(*die);
    return t ? type_name(index, &*t) : std::string("void");
  };
  if (is_named_type(tag)) {
    std::string q = index.qualified_name(*die);
    return fmt::format("{} {}", record_word(tag), q.empty() ? "(unnamed)" : q);
  }
  switch (tag) {
    case DW_TAG_pointer_type: return inner() + " *";
    case DW_TAG_reference_type: return inner() + " &";
    case DW_TAG_rvalue_reference_type: return inner() + " &&";
    case DW_TAG_const_type: return "const " + inner();
    case DW_TAG_volatile_type: return "volatile " + inner();
    case DW_TAG_restrict_type:
    case DW_TAG_atomic_type: return inner();
    case DW_TAG_array_type: return inner() + "[]";
    case DW_TAG_subroutine_type: return "function";
    case DW_TAG_ptr_to_member_type: return "member pointer";
  }
  std::string n = name_of(*die);
  return n.empty() ? "?" : n;
}

std::optional<TypeDifference> TypeComparer::signatures(Dwarf_Die t, Dwarf_Die f, const std::string& function) {
  if (auto d = same({target_, type_of(t)}, {fix_, type_of(f)}, function + " returns", 0)) return d;
  return parameters(t, f, function, 0);
}

std::optional<TypeDifference> TypeComparer::variables(Dwarf_Die t, Dwarf_Die f, const std::string& variable) {
  return same({target_, type_of(t)}, {fix_, type_of(f)}, fmt::format("variable '{}' is", variable), 0);
}

std::optional<TypeDifference> TypeComparer::parameters(Dwarf_Die t, Dwarf_Die f, const std::string& function, int depth) {
  auto tp = parameters_of(t), fp = parameters_of(f);
  if (tp.list.size() != fp.list.size())
    return TypeDifference{fmt::format("{} takes {} parameter{} in the target but {} in fix.so", function, tp.list.size(),
                                      tp.list.size() == 1 ? "" : "s", fp.list.size())};
  if (tp.variadic != fp.variadic)
    return TypeDifference{fmt::format("{} is {}variadic in the target but {}variadic in fix.so", function,
                                      tp.variadic ? "" : "not ", fp.variadic ? "" : "not ")};
  for (size_t i = 0; i < tp.list.size(); i++) {
    std::string name = name_of(tp.list[i]);
    std::string what = fmt::format("parameter {}{} of {} is", i + 1, name.empty() ? "" : " ('" + name + "')", function);
    if (auto d = same({target_, type_of(tp.list[i])}, {fix_, type_of(fp.list[i])}, what, depth + 1)) return d;
  }
  return std::nullopt;
}

// The two sides differ as values: class or size ("'int' (4 bytes, integer)").
std::optional<TypeDifference> TypeComparer::value(const Side& t, const Side& f, const std::string& what) {
  auto ts = strip(t.die), fs = strip(f.die);
  Kind tk = kind_of(ts), fk = kind_of(fs);
  auto tz = size_of(ts), fz = size_of(fs);
  // Records and enums of the same class are compared member by member (layout), which names
  // what moved; their sizes come last there.
  bool named = ts && fs && is_named_type(dwarf_tag(&*ts)) && is_named_type(dwarf_tag(&*fs));
  if (tk == fk && (named || tz == fz || !tz || !fz)) return std::nullopt;
  auto describe = [&](const Side& s, Kind k, std::optional<uint64_t> size) {
    Dwarf_Die d = s.die ? *s.die : Dwarf_Die{};
    std::string name = type_name(s.index, s.die ? &d : nullptr);
    if (k == Kind::none) return fmt::format("'{}'", name);
    if (!size) return fmt::format("'{}' ({})", name, kind_name(k));
    return fmt::format("'{}' ({} byte{}, {})", name, *size, *size == 1 ? "" : "s", kind_name(k));
  };
  return TypeDifference{fmt::format("{} {} in the target but {} in fix.so", what, describe(t, tk, tz), describe(f, fk, fz))};
}

std::optional<TypeDifference> TypeComparer::same(const Side& t, const Side& f, const std::string& what, int depth) {
  if (depth > kMaxDepth) return std::nullopt;
  if (auto d = value(t, f, what)) return d;
  Side ts{t.index, strip(t.die)}, fs{f.index, strip(f.die)};
  if (!ts.die || !fs.die) return std::nullopt;
  int tag = dwarf_tag(&*ts.die), ftag = dwarf_tag(&*fs.die);
  switch (kind_of(ts.die)) {
    case Kind::pointer:
      if (tag == DW_TAG_ptr_to_member_type || tag == DW_TAG_unspecified_type) return std::nullopt;
      return pointee(ts, fs, what, depth);
    case Kind::aggregate:
      if (tag == DW_TAG_array_type || ftag == DW_TAG_array_type)
        return same({t.index, type_of(*ts.die)}, {f.index, type_of(*fs.die)}, what + " an array of", depth + 1);
      return layout(ts, fs, depth);
    case Kind::integer:
      if (tag == DW_TAG_enumeration_type && ftag == DW_TAG_enumeration_type) return layout(ts, fs, depth);
      return std::nullopt;
    default: return std::nullopt;
  }
}

// What two pointers (or references) point to: records and enums by layout, functions by
// signature, scalars by class and size; `void *` on either side says nothing.
std::optional<TypeDifference> TypeComparer::pointee(const Side& t, const Side& f, const std::string& what, int depth) {
  Side tp{t.index, strip(type_of(*t.die))}, fp{f.index, strip(type_of(*f.die))};
  if (!tp.die || !fp.die) return std::nullopt;
  Kind tk = kind_of(tp.die), fk = kind_of(fp.die);
  if (tk == Kind::function && fk == Kind::function) {
    if (auto d = same({t.index, type_of(*tp.die)}, {f.index, type_of(*fp.die)}, what + " a function pointer returning", depth + 1))
      return d;
    return parameters(*tp.die, *fp.die, what.substr(0, what.rfind(" is")) + "'s function type", depth + 1);
  }
  bool t_decl = flag_of(*tp.die, DW_AT_declaration), f_decl = flag_of(*fp.die, DW_AT_declaration);
  if ((t_decl || f_decl) && !(tk == Kind::aggregate && fk == Kind::aggregate)) return std::nullopt;  // an opaque type
  return same(tp, fp, what + " a pointer to", depth + 1);
}

std::optional<TypeDifference> TypeComparer::layout(const Side& t, const Side& f, int depth) {
  auto td = t.index.definition(*t.die), fd = f.index.definition(*f.die);
  if (!td || !fd) {
    Dwarf_Die d = *t.die;
    not_compared_.insert(fmt::format("{} (only declared in {})", type_name(t.index, &d), !td ? "the target" : "fix.so"));
    return std::nullopt;
  }
  if (!visited_.insert({offset_of(*td), offset_of(*fd)}).second) return std::nullopt;
  compared_.insert(offset_of(*td));
  if (dwarf_tag(&*td) == DW_TAG_enumeration_type) return enumeration(*td, *fd);
  return aggregate(*td, *fd, depth);
}

std::optional<TypeDifference> TypeComparer::aggregate(Dwarf_Die t, Dwarf_Die f, int depth) {
  std::string name = type_name(target_, &t);
  bool t_union = dwarf_tag(&t) == DW_TAG_union_type, f_union = dwarf_tag(&f) == DW_TAG_union_type;
  if (t_union != f_union)
    return TypeDifference{fmt::format("{} is a {} in the target but a {} in fix.so", name, t_union ? "union" : "struct",
                                      f_union ? "union" : "struct")};
  if (auto d = members(t, f, name, depth)) return d;
  if (auto d = bases(t, f, name, depth)) return d;
  if (auto d = virtuals(t, f, name)) return d;
  auto tz = size_of(t), fz = size_of(f);
  if (tz && fz && *tz != *fz)
    return TypeDifference{fmt::format("{} is {} bytes in the target but {} bytes in fix.so", name, *tz, *fz)};
  return std::nullopt;
}

// Members both sides have first (where they are, then what they are), then the ones only one
// side has: a lost member shows as the next one moving.
std::optional<TypeDifference> TypeComparer::members(Dwarf_Die t, Dwarf_Die f, const std::string& name, int depth) {
  auto tm = members_of(t), fm = members_of(f);
  for (auto& m : tm) {
    const Member* other = member_named(fm, m.name);
    if (!other) continue;
    if (m.bit_position != other->bit_position || m.bit_size != other->bit_size)
      return TypeDifference{fmt::format("{}: member '{}' is {} in the target but {} in fix.so", name, m.name,
                                        placement(m), placement(*other))};
    if (auto d = same({target_, type_of(m.die)}, {fix_, type_of(other->die)},
                      fmt::format("{}: member '{}' is", name, m.name), depth + 1))
      return d;
  }
  for (auto& m : tm)
    if (!member_named(fm, m.name))
      return TypeDifference{fmt::format("{}: member '{}' ({} in the target) is not in fix.so", name, m.name, placement(m))};
  for (auto& m : fm)
    if (!member_named(tm, m.name))
      return TypeDifference{fmt::format("{}: member '{}' of fix.so ({}) is not in the target", name, m.name, placement(m))};
  return std::nullopt;
}

std::optional<TypeDifference> TypeComparer::bases(Dwarf_Die t, Dwarf_Die f, const std::string& name, int depth) {
  auto tb = bases_of(t), fb = bases_of(f);
  if (tb.size() != fb.size())
    return TypeDifference{fmt::format("{} has {} base class{} in the target but {} in fix.so", name, tb.size(),
                                      tb.size() == 1 ? "" : "es", fb.size())};
  for (size_t i = 0; i < tb.size(); i++) {
    std::string base = type_name(target_, &tb[i].type);
    if (tb[i].offset != fb[i].offset || tb[i].is_virtual != fb[i].is_virtual)
      return TypeDifference{fmt::format("{}: base {} is {}at offset {} in the target but {}at offset {} in fix.so", name,
                                        base, tb[i].is_virtual ? "virtual, " : "", tb[i].offset,
                                        fb[i].is_virtual ? "virtual, " : "", fb[i].offset)};
    if (auto d = same({target_, tb[i].type}, {fix_, fb[i].type}, fmt::format("{}: base {} is", name, base), depth + 1))
      return d;
  }
  return std::nullopt;
}

std::optional<TypeDifference> TypeComparer::virtuals(Dwarf_Die t, Dwarf_Die f, const std::string& name) {
  bool tv = has_vtable(target_, t), fv = has_vtable(fix_, f);
  if (tv != fv)
    return TypeDifference{fmt::format("{} has {} in the target but {} in fix.so", name, tv ? "a vtable" : "no vtable",
                                      fv ? "a vtable" : "none")};
  auto tl = virtuals_of(t), fl = virtuals_of(f);
  auto find = [](const std::vector<Virtual>& l, const std::string& n) -> const Virtual* {
    for (auto& v : l)
      if (v.name == n) return &v;
    return nullptr;
  };
  for (auto& v : tl) {
    const Virtual* other = find(fl, v.name);
    if (!other)
      return TypeDifference{fmt::format("{}: virtual method '{}' ({} in the target) is not in fix.so", name, v.name, slot_text(v.slot))};
    if (other->slot != v.slot)
      return TypeDifference{fmt::format("{}: virtual method '{}' is in vtable {} in the target but {} in fix.so", name,
                                        v.name, slot_text(v.slot), slot_text(other->slot))};
  }
  for (auto& v : fl)
    if (!find(tl, v.name))
      return TypeDifference{fmt::format("{}: virtual method '{}' of fix.so ({}) is not in the target", name, v.name, slot_text(v.slot))};
  return std::nullopt;
}

std::optional<TypeDifference> TypeComparer::enumeration(Dwarf_Die t, Dwarf_Die f) {
  std::string name = type_name(target_, &t);
  auto values = [](Dwarf_Die e) {
    std::vector<std::pair<std::string, int64_t>> out;
    for_children(e, [&](Dwarf_Die c) {
      if (dwarf_tag(&c) == DW_TAG_enumerator) out.push_back({name_of(c), sdata_of(c, DW_AT_const_value).value_or(0)});
    });
    return out;
  };
  auto tv = values(t), fv = values(f);
  auto find = [](const auto& l, const std::string& n) -> const std::pair<std::string, int64_t>* {
    for (auto& v : l)
      if (v.first == n) return &v;
    return nullptr;
  };
  for (auto& [n, v] : tv) {
    auto* other = find(fv, n);
    if (!other) return TypeDifference{fmt::format("{}: enumerator '{}' (= {} in the target) is not in fix.so", name, n, v)};
    if (other->second != v)
      return TypeDifference{fmt::format("{}: enumerator '{}' is {} in the target but {} in fix.so", name, n, v, other->second)};
  }
  for (auto& [n, v] : fv)
    if (!find(tv, n)) return TypeDifference{fmt::format("{}: enumerator '{}' of fix.so (= {}) is not in the target", name, n, v)};
  auto tz = size_of(t), fz = size_of(f);
  if (tz && fz && *tz != *fz)
    return TypeDifference{fmt::format("{} is {} bytes in the target but {} bytes in fix.so", name, *tz, *fz)};
  return std::nullopt;
}

}  // namespace hotfix
