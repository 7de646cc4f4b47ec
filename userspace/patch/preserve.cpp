#include "patch/preserve.hpp"

#include <dwarf.h>
#include <elfutils/libdw.h>
#include <elfutils/libdwelf.h>
#include <fcntl.h>
#include <gelf.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <optional>

#include "arch/arch.hpp"
#include "common/unique_fd.hpp"
#include "patch/engine.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"

namespace hotfix {

namespace {

// ---- the function's DWARF: its object, or a separate debug file found by build-id ----

struct DwarfFile {
  UniqueFd fd;
  Dwarf* dwarf = nullptr;
  ~DwarfFile() {
    if (dwarf) dwarf_end(dwarf);
  }
};

std::unique_ptr<DwarfFile> open_dwarf(const std::string& path) {
  auto f = std::make_unique<DwarfFile>();
  f->fd = UniqueFd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!f->fd) return nullptr;
  f->dwarf = dwarf_begin(f->fd.get(), DWARF_C_READ);
  if (!f->dwarf) return nullptr;
  Dwarf_Off next = 0;
  size_t header = 0;
  if (dwarf_nextcu(f->dwarf, 0, &next, &header, nullptr, nullptr, nullptr) != 0) return nullptr;  // no CUs
  return f;
}

// The link-time address of the byte at file offset `offset` of `object`, and its build-id.
std::optional<uint64_t> file_vaddr(const std::string& object, uint64_t offset, std::string& build_id) {
  UniqueFd fd(::open(object.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return std::nullopt;
  elf_version(EV_CURRENT);
  Elf* elf = elf_begin(fd.get(), ELF_C_READ, nullptr);
  if (!elf) return std::nullopt;
  std::optional<uint64_t> out;
  size_t n = 0;
  if (elf_getphdrnum(elf, &n) == 0)
    for (size_t i = 0; i < n && !out; ++i) {
      GElf_Phdr ph;
      if (gelf_getphdr(elf, static_cast<int>(i), &ph) && ph.p_type == PT_LOAD && offset >= ph.p_offset &&
          offset < ph.p_offset + ph.p_filesz)
        out = ph.p_vaddr + (offset - ph.p_offset);
    }
  const void* id = nullptr;
  ssize_t len = dwelf_elf_gnu_build_id(elf, &id);
  for (ssize_t i = 0; i < len; ++i) build_id += fmt::format("{:02x}", static_cast<const uint8_t*>(id)[i]);
  elf_end(elf);
  return out;
}

std::unique_ptr<DwarfFile> dwarf_for(const std::string& object, const std::string& build_id) {
  if (auto f = open_dwarf(object)) return f;
  if (build_id.size() <= 2) return nullptr;
  const char* env = std::getenv("HOTFIX_DEBUG_ROOT");
  std::string root = env && *env ? env : "/usr/lib/debug";
  return open_dwarf(fmt::format("{}/.build-id/{}/{}.debug", root, build_id.substr(0, 2), build_id.substr(2)));
}

// Does the code of `die` start at `vaddr`? Its entry pc, or (a function split into hot and
// cold parts has only DW_AT_ranges) the start of one of its ranges.
bool starts_at(Dwarf_Die* die, uint64_t vaddr) {
  Dwarf_Addr entry = 0, base = 0, begin = 0, end = 0;
  if (dwarf_entrypc(die, &entry) == 0) return entry == vaddr;
  for (ptrdiff_t off = 0; (off = dwarf_ranges(die, off, &base, &begin, &end)) > 0;)
    if (begin == vaddr) return true;
  return false;
}

// The DW_TAG_subprogram whose code starts at `vaddr` (an out-of-line definition).
std::optional<Dwarf_Die> subprogram_at(Dwarf* dwarf, uint64_t vaddr) {
  Dwarf_Die cu;
  if (!dwarf_addrdie(dwarf, vaddr, &cu)) return std::nullopt;
  Dwarf_Die* scopes = nullptr;
  int n = dwarf_getscopes(&cu, vaddr, &scopes);
  std::optional<Dwarf_Die> out;
  for (int i = 0; i < n && !out; ++i)
    if (dwarf_tag(&scopes[i]) == DW_TAG_subprogram && starts_at(&scopes[i], vaddr)) out = scopes[i];
  free(scopes);
  return out;
}

// ---- where the System V ABI puts each parameter (conservatively) ----

struct ArgUse {
  int ints = 0, vectors = 0;  // registers an argument may take (both counted where either is possible)
  std::string stack;          // non-empty: this goes on the stack, and why
};

std::optional<Dwarf_Die> type_of(Dwarf_Die* die) {
  Dwarf_Attribute attr;
  Dwarf_Die type, peeled;
  if (!dwarf_attr_integrate(die, DW_AT_type, &attr) || !dwarf_formref_die(&attr, &type)) return std::nullopt;
  if (dwarf_peel_type(&type, &peeled) != 0) return std::nullopt;  // typedefs and qualifiers
  return peeled;
}

uint64_t size_of(Dwarf_Die* type) {
  Dwarf_Word size = 0;
  return dwarf_aggregate_size(type, &size) == 0 ? size : 0;
}

bool is_aggregate(int tag) {
  return tag == DW_TAG_structure_type || tag == DW_TAG_class_type || tag == DW_TAG_union_type ||
         tag == DW_TAG_array_type;
}

// Would an aggregate of at most 16 bytes be passed in registers? Not when a member is
// unaligned (packed) or is a long double (x87 class: memory).
bool register_sized_members(Dwarf_Die* type, int depth = 0) {
  if (depth > 8) return false;
  Dwarf_Die child;
  if (dwarf_tag(type) == DW_TAG_array_type) {
    auto element = type_of(type);
    return element && (!is_aggregate(dwarf_tag(&*element)) || register_sized_members(&*element, depth + 1)) &&
           !(dwarf_tag(&*element) == DW_TAG_base_type && size_of(&*element) > 8);
  }
  if (dwarf_child(type, &child) != 0) return true;  // no members
  do {
    int tag = dwarf_tag(&child);
    if (tag != DW_TAG_member && tag != DW_TAG_inheritance) continue;
    Dwarf_Attribute attr;
    if (tag == DW_TAG_member && !dwarf_attr(&child, DW_AT_data_member_location, &attr) &&
        dwarf_tag(type) != DW_TAG_union_type && !dwarf_hasattr(&child, DW_AT_data_bit_offset))
      continue;  // a static member: not part of the object
    auto member = type_of(&child);
    if (!member) return false;
    uint64_t size = size_of(&*member);
    if (dwarf_tag(&*member) == DW_TAG_base_type && size > 8) return false;  // long double, __int128 inside
    Dwarf_Word offset = 0;
    if (dwarf_attr(&child, DW_AT_data_member_location, &attr) && dwarf_formudata(&attr, &offset) == 0) {
      uint64_t align = std::min<uint64_t>(size ? size : 1, 8);
      if (!dwarf_hasattr(&child, DW_AT_bit_size) && !is_aggregate(dwarf_tag(&*member)) && offset % align) return false;
    }
    if (is_aggregate(dwarf_tag(&*member)) && !register_sized_members(&*member, depth + 1)) return false;
  } while (dwarf_siblingof(&child, &child) == 0);
  return true;
}

ArgUse arg_use(std::optional<Dwarf_Die> type) {
  if (!type) return {0, 0, "its type is not in the DWARF"};
  int tag = dwarf_tag(&*type);
  uint64_t size = size_of(&*type);
  switch (tag) {
    case DW_TAG_pointer_type: case DW_TAG_reference_type: case DW_TAG_rvalue_reference_type:
    case DW_TAG_enumeration_type: case DW_TAG_subroutine_type:
      return {1, 0, ""};
    case DW_TAG_ptr_to_member_type:
      return {static_cast<int>((size + 7) / 8), 0, ""};
    case DW_TAG_base_type: {
      Dwarf_Attribute attr;
      Dwarf_Word encoding = 0;
      if (dwarf_attr(&*type, DW_AT_encoding, &attr)) dwarf_formudata(&attr, &encoding);
      bool floating = encoding == DW_ATE_float || encoding == DW_ATE_complex_float;
      if (floating && size > 16) return {0, 0, "a complex long double"};
      if (encoding == DW_ATE_float && size > 8) return {0, 0, "a long double or 128-bit float"};
      if (floating) return {0, static_cast<int>((size + 7) / 8), ""};
      if (size > 16 || size == 0) return {0, 0, fmt::format("a {}-byte scalar", size)};
      return {static_cast<int>((size + 7) / 8), 0, ""};
    }
    default: break;
  }
  if (!is_aggregate(tag)) return {0, 0, "a parameter of a kind hotfix does not classify"};
  Dwarf_Attribute attr;
  Dwarf_Word convention = 0;
  if (dwarf_attr(&*type, DW_AT_calling_convention, &attr) && dwarf_formudata(&attr, &convention) == 0 &&
      convention == DW_CC_pass_by_reference)
    return {1, 0, ""};  // a C++ class that is not trivially copyable: an invisible pointer
  if (size > 16 || size == 0) return {0, 0, fmt::format("a {}-byte aggregate passed by value", size)};
  if (!register_sized_members(&*type)) return {0, 0, "a packed aggregate or one holding a long double"};
  int words = static_cast<int>((size + 7) / 8);
  return {words, words, ""};  // integer or SSE eightbytes: count both, so either way fits
}

// One line: why the arguments of `fn` may not all be in registers, or "".
std::string stack_arguments(Dwarf_Die* fn, bool& returns_value) {
  ArgUse total;
  auto ret = type_of(fn);
  returns_value = ret.has_value();
  if (ret && is_aggregate(dwarf_tag(&*ret))) {
    ArgUse r = arg_use(ret);
    if (!r.stack.empty() || size_of(&*ret) > 16) total.ints = 1;  // returned in memory: rdi holds where
  }
  Dwarf_Die child;
  if (dwarf_child(fn, &child) == 0) do {
      int tag = dwarf_tag(&child);
      if (tag == DW_TAG_unspecified_parameters) return "it is variadic (its variable arguments may be on the stack)";
      if (tag != DW_TAG_formal_parameter) continue;
      ArgUse a = arg_use(type_of(&child));
      const char* name = dwarf_diename(&child);
      if (!a.stack.empty()) return fmt::format("parameter {} is {}, passed on the stack", name ? name : "?", a.stack);
      total.ints += a.ints, total.vectors += a.vectors;
    } while (dwarf_siblingof(&child, &child) == 0);
  if (total.ints > 6) return fmt::format("it takes {} integer-register arguments, more than the 6 registers", total.ints);
  if (total.vectors > 8) return fmt::format("it takes {} vector-register arguments, more than the 8 registers", total.vectors);
  return "";
}

// ---- the target's unwinder ----

bool journaled(const std::vector<JournalRecord>& records, uint32_t id, const char* step, uint64_t frame) {
  for (auto& r : records)
    if (r.id == id && r.step == step && r.number("address") == frame) return true;
  return false;
}

uint64_t page_of(uint64_t a) { return a & ~(static_cast<uint64_t>(::getpagesize()) - 1); }

}  // namespace

bool preserve__supported(const PlannedSwitch& s, std::string& why) {
  const Function& fn = s.entry.target;
  if (s.preserve & ~arch::preservable_registers()) {
    why = "the island cannot save every one of those registers";
    return false;
  }
  std::string build_id;
  auto vaddr = file_vaddr(fn.object, fn.offset, build_id);
  auto file = vaddr ? dwarf_for(fn.object, build_id) : nullptr;
  std::optional<Dwarf_Die> die = file ? subprogram_at(file->dwarf, *vaddr) : std::nullopt;
  if (!die) {
    why = fmt::format("{} has no DWARF for {}, so hotfix cannot tell whether it takes arguments on the stack "
                      "(build it with -g or install its -dbgsym package)", fn.object, fn.name);
    return false;
  }
  // gas describes a hand-written function with a bare DIE: no type, no parameters. That says
  // nothing about its arguments, so it must not read as `void f(void)`.
  Dwarf_Die cu;
  if (dwarf_diecu(&*die, &cu, nullptr, nullptr) && dwarf_srclang(&cu) == DW_LANG_Mips_Assembler) {
    why = fmt::format("{} is hand-written assembly, whose DWARF does not describe its arguments", fn.name);
    return false;
  }
  // An out-of-line copy of an inline function or a clone may list fewer parameters than its
  // origin declares: judge the origin (or the declaration) too.
  std::vector<Dwarf_Die> views{*die};
  Dwarf_Attribute attr;
  Dwarf_Die origin;
  for (unsigned name : {DW_AT_abstract_origin, DW_AT_specification})
    if (dwarf_attr(&*die, name, &attr) && dwarf_formref_die(&attr, &origin)) views.push_back(origin);
  bool returns_value = false;
  for (auto& view : views) {
    bool returns = false;
    if (auto stack = stack_arguments(&view, returns); !stack.empty()) {
      why = fmt::format("{} may take arguments on the stack ({}); a preserving island would move them", fn.name, stack);
      return false;
    }
    returns_value |= returns;
  }
  if (returns_value && (s.preserve & arch::return_value_registers())) {
    why = fmt::format("{} returns a value, and restoring {} would overwrite it", fn.name,
                      arch::register_names(s.preserve & arch::return_value_registers()));
    return false;
  }
  return true;
}

Result<Unwinder> preserve__unwinder(Tracee& t, uint64_t fix_handle, std::chrono::milliseconds timeout) {
  Unwinder u;
  auto opts = InjectOptions::within(timeout);
  for (uint64_t handle : {fix_handle, uint64_t{0} /* RTLD_DEFAULT */}) {
    u.register_frame = HOTFIX_TRY(remote__dlsym(t, handle, "__register_frame", opts));
    u.deregister_frame = HOTFIX_TRY(remote__dlsym(t, handle, "__deregister_frame", opts));
    if (u) return u;
  }
  return Unwinder{};
}

Result<void> preserve__register(Tracee& t, Journal& j, const std::string& op, uint32_t id, const Unwinder& u,
                                uint64_t frame, std::chrono::milliseconds timeout) {
  HOTFIX_CHECK(j.append(journal__record(op, id, "frame-registering").set("address", frame)));
  std::vector<uint64_t> args{frame};
  if (auto r = remote__call_safe(t, u.register_frame, args, InjectOptions::within(timeout)); !r)
    return fail(fmt::format("registering the unwind information of a preserving island at {:#x} failed: {}", frame,
                            r.error().what),
                "nothing was switched; retry, or leave the function out of the patch");
  return j.append(journal__record(op, id, "frame-registered").set("address", frame));
}

Result<void> preserve__deregister(Tracee& t, Journal& j, const std::string& op, uint32_t id, const Unwinder& u,
                                  uint64_t frame, std::chrono::milliseconds timeout) {
  HOTFIX_CHECK(j.append(journal__record(op, id, "frame-deregistering").set("address", frame)));
  std::vector<uint64_t> args{frame};
  if (auto r = remote__call_safe(t, u.deregister_frame, args, InjectOptions::within(timeout)); !r)
    return std::unexpected(r.error());
  return j.append(journal__record(op, id, "frame-deregistered").set("address", frame));
}

std::set<uint64_t> preserve__release_frames(Tracee& t, Journal& j, const PatchRecord& p,
                                            std::chrono::milliseconds timeout, std::string& note) {
  std::set<uint64_t> keep;
  auto records = j.read();
  std::optional<Unwinder> u;
  for (auto& f : p.functions) {
    if (!f.frame) continue;
    if (journaled(records, p.id, "frame-deregistered", f.frame)) continue;  // an earlier release did it
    // Deregistering a frame libgcc no longer has aborts the target: after an interrupted
    // attempt, hotfix cannot know, and keeps the page (libgcc's record stays valid).
    bool attempted = journaled(records, p.id, "frame-deregistering", f.frame);
    if (!attempted && !u) u = preserve__unwinder(t, p.handle, timeout).value_or(Unwinder{});
    if (attempted || !*u || !preserve__deregister(t, j, "release", p.id, *u, f.frame, timeout)) {
      keep.insert(page_of(f.island));
      note = "an island page stays mapped: its unwind information may still be registered with the target's unwinder";
    }
  }
  return keep;
}

std::vector<uint64_t> preserve__journaled_frames(const std::vector<JournalRecord>& records, uint32_t id) {
  std::vector<uint64_t> out;
  for (auto& r : records)
    if (r.id == id && r.step == "frame-registering" && !journaled(records, id, "frame-deregistered", r.number("address")))
      out.push_back(r.number("address"));
  return out;
}

}  // namespace hotfix
