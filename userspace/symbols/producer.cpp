// DW_AT_producer of every compile unit, read with libdw. Only CU DIEs are read (no type or
// function DIEs), so even a large object's DWARF takes milliseconds.
#include "symbols/producer.hpp"

#include <dwarf.h>
#include <elfutils/libdw.h>
#include <elfutils/libdwelf.h>
#include <fcntl.h>
#include <gelf.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <sstream>

#include "common/unique_fd.hpp"

namespace hotfix {

const char* source_language__name(SourceLanguage l) {
  switch (l) {
    case SourceLanguage::c: return "C";
    case SourceLanguage::cxx: return "C++";
    case SourceLanguage::rust: return "Rust";
    case SourceLanguage::assembler: return "assembler";
    case SourceLanguage::other: return "another language";
    case SourceLanguage::unknown: break;
  }
  return "unknown";
}

namespace {

SourceLanguage language_of(int dw_lang) {
  switch (dw_lang) {
    case DW_LANG_C89: case DW_LANG_C: case DW_LANG_C99: case DW_LANG_C11:
#ifdef DW_LANG_C17
    case DW_LANG_C17:
#endif
      return SourceLanguage::c;
    case DW_LANG_C_plus_plus: case DW_LANG_C_plus_plus_03: case DW_LANG_C_plus_plus_11:
    case DW_LANG_C_plus_plus_14:
#ifdef DW_LANG_C_plus_plus_17
    case DW_LANG_C_plus_plus_17:
#endif
#ifdef DW_LANG_C_plus_plus_20
    case DW_LANG_C_plus_plus_20:
#endif
      return SourceLanguage::cxx;
    case DW_LANG_Rust: return SourceLanguage::rust;
    case DW_LANG_Mips_Assembler: return SourceLanguage::assembler;
    default: return dw_lang ? SourceLanguage::other : SourceLanguage::unknown;
  }
}

std::vector<std::string> words(const std::string& text) {
  std::istringstream in(text);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

bool version_like(const std::string& w) { return !w.empty() && std::isdigit(static_cast<unsigned char>(w[0])); }

// Command-line words to switches: options that take their argument separately are joined
// (`-D X` -> `-DX`), the arguments of -o/-MF/-MT/-MQ/-x and non-option words (sources,
// the compiler's path) are dropped.
std::vector<std::string> switches_of(const std::vector<std::string>& w, size_t from) {
  static const char* joined[] = {"-D", "-U", "-I", "-include", "-isystem", "-iquote"};
  static const char* skipped[] = {"-o", "-MF", "-MT", "-MQ", "-x", "-Xclang", "-main-file-name"};
  std::vector<std::string> out;
  for (size_t i = from; i < w.size(); i++) {
    const std::string& s = w[i];
    if (s.empty() || s[0] != '-') continue;
    if (std::any_of(std::begin(skipped), std::end(skipped), [&](const char* o) { return s == o; })) {
      i++;
      continue;
    }
    if (i + 1 < w.size() && std::any_of(std::begin(joined), std::end(joined), [&](const char* o) { return s == o; })) {
      out.push_back(s + w[++i]);
      continue;
    }
    out.push_back(s);
  }
  return out;
}

}  // namespace

Producer producer__parse(const std::string& text, SourceLanguage language) {
  Producer p;
  p.text = text;
  p.language = language;
  auto w = words(text);
  if (w.empty()) return p;
  if (w[0] == "GNU" && w.size() >= 2 && w[1] == "AS") {  // "GNU AS 2.40": gas's own unit for a .s file
    p.family = "GNU AS";
    if (w.size() > 2) p.version = w[2];
    p.language = SourceLanguage::assembler;
  } else if (w[0] == "GNU" && w.size() >= 3) {  // "GNU C17 12.2.0 -mtune=generic ... -O2"
    p.family = "GCC";
    p.standard = w[1];
    p.lto = w[1] == "GIMPLE";
    p.version = w[2];
    p.switches = switches_of(w, 3);
    p.switches_recorded = w.size() > 3;
    if (p.language == SourceLanguage::unknown) {
      if (p.standard.rfind("C++", 0) == 0) p.language = SourceLanguage::cxx;
      else if (p.standard.size() >= 2 && p.standard[0] == 'C' && std::isdigit(static_cast<unsigned char>(p.standard[1])))
        p.language = SourceLanguage::c;
    }
  } else if (text.find("rustc version") != std::string::npos) {  // "clang LLVM (rustc version 1.63.0)"
    p.family = "rustc";
    auto at = text.find("rustc version") + 14;
    p.version = words(text.substr(at)).empty() ? "" : words(text.substr(at))[0];
    while (!p.version.empty() && !std::isdigit(static_cast<unsigned char>(p.version.back()))) p.version.pop_back();
    p.language = SourceLanguage::rust;
  } else if (auto at = std::find(w.begin(), w.end(), "version"); at != w.end() && at != w.begin() &&
                                                                  *(at - 1) == "clang" && at + 1 != w.end()) {
    // "Debian clang version 14.0.6 [(url commit)] [/usr/bin/clang -O2 ... -c x.c -o x.o]"
    p.family = "clang";
    p.version = *(at + 1);
    size_t command = static_cast<size_t>(at - w.begin()) + 2;
    while (command < w.size() && w[command][0] != '/' && w[command][0] != '-') command++;  // "(https://... abc)"
    p.switches_recorded = command < w.size();
    p.switches = switches_of(w, command);
  } else {
    p.family = w[0];
    for (auto& word : w)
      if (version_like(word)) {
        p.version = word;
        break;
      }
  }
  p.major = std::atoi(p.version.c_str());
  return p;
}

std::string producer__compiler(const Producer& p) {
  if (p.family.empty()) return "an unknown compiler";
  return p.version.empty() ? p.family : p.family + " " + p.version;
}

const CompileUnit* ObjectProducers::unit_at(uint64_t file_address) const {
  for (auto& u : units)
    for (auto& [lo, hi] : u.ranges)
      if (file_address >= lo && file_address < hi) return &u;
  return nullptr;
}

const Producer* ObjectProducers::dominant(SourceLanguage language) const {
  auto pick = [&](bool any_language) -> const Producer* {
    std::map<std::string, std::pair<int, const Producer*>> counts;
    for (auto& u : units) {
      const Producer& p = u.producer;
      if (p.text.empty() || p.language == SourceLanguage::assembler || p.lto) continue;
      if (!any_language && p.language != language) continue;
      auto& c = counts[p.text];
      c.first++;
      c.second = &p;
    }
    const Producer* best = nullptr;
    int most = 0;
    for (auto& [text, c] : counts)
      if (c.first > most) most = c.first, best = c.second;
    return best;
  };
  if (language != SourceLanguage::unknown)
    if (auto* p = pick(false)) return p;
  if (auto* p = pick(true)) return p;
  for (auto& u : units)  // only LTO units: their switches are lto1's, still better than nothing
    if (!u.producer.text.empty() && u.producer.language != SourceLanguage::assembler) return &u.producer;
  return nullptr;
}

namespace {

bool has_debug_info(Elf* elf) {
  size_t shstrndx = 0;
  if (elf_getshdrstrndx(elf, &shstrndx) != 0) return false;
  Elf_Scn* scn = nullptr;
  while ((scn = elf_nextscn(elf, scn))) {
    GElf_Shdr shdr;
    if (!gelf_getshdr(scn, &shdr) || shdr.sh_type == SHT_NOBITS) continue;
    const char* name = elf_strptr(elf, shstrndx, shdr.sh_name);
    if (name && (std::string(name) == ".debug_info" || std::string(name) == ".zdebug_info")) return true;
  }
  return false;
}

std::string attr_string(Dwarf_Die* die, int name) {
  Dwarf_Attribute attr;
  const char* s = dwarf_attr_integrate(die, name, &attr) ? dwarf_formstring(&attr) : nullptr;
  return s ? s : "";
}

void read_units(Elf* elf, ObjectProducers& out) {
  Dwarf* dw = dwarf_begin_elf(elf, DWARF_C_READ, nullptr);
  if (!dw) {
    out.why_none = fmt::format("libdw cannot read its DWARF: {}", dwarf_errmsg(-1));
    return;
  }
  Dwarf_CU* cu = nullptr;
  Dwarf_Die cudie;
  uint8_t unit_type = 0;
  while (dwarf_get_units(dw, cu, &cu, nullptr, &unit_type, &cudie, nullptr) == 0) {
    if (unit_type == DW_UT_partial || unit_type == DW_UT_type) continue;  // dwz's shared parts, type units
    if (dwarf_tag(&cudie) != DW_TAG_compile_unit) continue;
    CompileUnit u;
    u.name = attr_string(&cudie, DW_AT_name);
    Dwarf_Word lang = 0;
    Dwarf_Attribute attr;
    if (dwarf_attr(&cudie, DW_AT_language, &attr)) dwarf_formudata(&attr, &lang);
    u.producer = producer__parse(attr_string(&cudie, DW_AT_producer), language_of(static_cast<int>(lang)));
    Dwarf_Addr base = 0, lo = 0, hi = 0;
    for (ptrdiff_t off = 0; (off = dwarf_ranges(&cudie, off, &base, &lo, &hi)) > 0;)
      if (hi > lo) u.ranges.emplace_back(lo, hi);
    out.units.push_back(std::move(u));
  }
  dwarf_end(dw);
  if (out.units.empty()) out.why_none = "its DWARF has no compile units";
}

// Read the DWARF of `fd` (an ELF file) into `out`; true if it had any.
bool read_fd(int fd, const std::string& name, ObjectProducers& out) {
  Elf* elf = elf_begin(fd, ELF_C_READ_MMAP, nullptr);
  if (!elf) return false;
  bool found = elf_kind(elf) == ELF_K_ELF && has_debug_info(elf);
  if (found) {
    out.dwarf_file = name;
    read_units(elf, out);
  }
  elf_end(elf);
  return found;
}

std::string debuglink_of(int fd) {
  Elf* elf = elf_begin(fd, ELF_C_READ_MMAP, nullptr);
  if (!elf) return "";
  GElf_Word crc = 0;
  const char* link = dwelf_elf_gnu_debuglink(elf, &crc);
  std::string out = link ? link : "";
  elf_end(elf);
  return out;
}

}  // namespace

ObjectProducers producer__read_file(const std::string& path, const std::string& open_path, const std::string& build_id,
                                const std::string& debug_file, const SymbolOptions& opts) {
  elf_version(EV_CURRENT);
  ObjectProducers out;
  const std::string& at = open_path.empty() ? path : open_path;
  UniqueFd fd(::open(at.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd && at != path) fd.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    out.why_none = fmt::format("cannot open {}: {}", path, errno_text(errno));
    return out;
  }
  if (read_fd(fd.get(), path, out)) return out;
  std::string separate = debug_file;
  if (separate.empty()) separate = symbols__find_debug_file(path, build_id, debuglink_of(fd.get()), opts);
  if (!separate.empty()) {
    UniqueFd dfd(::open(separate.c_str(), O_RDONLY | O_CLOEXEC));
    if (dfd && read_fd(dfd.get(), separate, out)) return out;
  }
  const char* root = std::getenv("HOTFIX_DEBUG_ROOT");
  std::string debug_root = !opts.debug_root.empty() ? opts.debug_root : root && *root ? root : "/usr/lib/debug";
  out.why_none = fmt::format("{} has no DWARF (stripped) and no debug file was found for it{} under {}", path,
                             build_id.empty() ? "" : fmt::format(" (build-id {})", build_id), debug_root);
  return out;
}

ObjectProducers producer__read_image(std::span<const uint8_t> bytes, const std::string& name) {
  elf_version(EV_CURRENT);
  ObjectProducers out;
  std::vector<char> copy(bytes.begin(), bytes.end());  // libelf may write into an ELF_C_READ_MMAP-less image
  Elf* elf = elf_memory(copy.data(), copy.size());
  if (!elf) {
    out.why_none = fmt::format("{} is not an ELF file libelf can read", name);
    return out;
  }
  if (elf_kind(elf) == ELF_K_ELF && has_debug_info(elf)) {
    out.dwarf_file = name;
    read_units(elf, out);
  } else {
    out.why_none = fmt::format("{} has no DWARF (built without -g, or stripped)", name);
  }
  elf_end(elf);
  return out;
}

// ---------------------------------------------------------------- ABI-changing switches

const std::vector<AbiFlag>& producer__abi_flags() {
  static const std::vector<AbiFlag> flags = {
      {"-fshort-enums", "enums take the smallest integer type that holds their values"},
      {"-fpack-struct", "structures lose their padding"},
      {"-m32/-mx32", "pointers and longs have another size"},
      {"-malign-double", "doubles in structures are aligned differently"},
      {"-freg-struct-return", "small structures are returned another way"},
      {"-fshort-wchar", "wchar_t has another size"},
      {"-mlong-double", "long double has another size"},
      {"_GLIBCXX_USE_CXX11_ABI", "std::string and std::list have another layout"},
  };
  return flags;
}

namespace {

// The last switch that starts with one of `prefixes` ("" when none): later ones win.
std::string last_of(const Producer& p, std::initializer_list<const char*> prefixes, bool exact = true) {
  std::string out;
  for (auto& s : p.switches)
    for (const char* pre : prefixes)
      if (exact ? s == pre : s.rfind(pre, 0) == 0) out = s;
  return out;
}

}  // namespace

std::string producer__abi_value(const Producer& p, const AbiFlag& flag) {
  std::string name = flag.name;
  auto off = [](std::string v, const char* no) { return v == no ? std::string() : v; };
  if (name == "-fshort-enums") return off(last_of(p, {"-fshort-enums", "-fno-short-enums"}), "-fno-short-enums");
  if (name == "-fpack-struct") return off(last_of(p, {"-fpack-struct", "-fno-pack-struct"}, false), "-fno-pack-struct");
  if (name == "-m32/-mx32") return off(last_of(p, {"-m32", "-mx32", "-m64"}), "-m64");
  if (name == "-malign-double") return off(last_of(p, {"-malign-double", "-mno-align-double"}), "-mno-align-double");
  if (name == "-freg-struct-return") return last_of(p, {"-freg-struct-return", "-fpcc-struct-return"});
  if (name == "-fshort-wchar") return off(last_of(p, {"-fshort-wchar", "-fno-short-wchar"}), "-fno-short-wchar");
  if (name == "-mlong-double") return last_of(p, {"-mlong-double-", "-m128bit-long-double", "-m96bit-long-double"}, false);
  if (name == "_GLIBCXX_USE_CXX11_ABI") {
    std::string v = last_of(p, {"-D_GLIBCXX_USE_CXX11_ABI", "-U_GLIBCXX_USE_CXX11_ABI"}, false);
    if (v.rfind("-D_GLIBCXX_USE_CXX11_ABI=", 0) == 0) return v.substr(v.find('=') + 1);
    return "";
  }
  return "";
}

}  // namespace hotfix
