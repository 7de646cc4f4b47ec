// arch/x86_64's writer and relocator (arch.hpp "moving instructions"): encodings checked by
// decoding them with Capstone, every refusal with its reason, and relocated code and counting
// trampolines executed in this real process -- hand-written shapes (rip-relative operands,
// rel8 branches widened, calls and branches beyond rel32 reach) and compiler-generated prologues.
#include <capstone/capstone.h>
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <thread>

#include "arch/arch.hpp"
#include "arch/x86_64/relocator.hpp"
#include "arch/x86_64/writer.hpp"
#include "support/harness.hpp"

using namespace hotfix;
using namespace hotfix::arch;

namespace {

std::string decode_all(std::span<const uint8_t> bytes, uint64_t address) {
  csh h;
  REQUIRE(cs_open(CS_ARCH_X86, CS_MODE_64, &h) == CS_ERR_OK);
  cs_insn* insn = nullptr;
  size_t n = cs_disasm(h, bytes.data(), bytes.size(), address, 0, &insn);
  std::string out;
  size_t size = 0;
  for (size_t i = 0; i < n; ++i) {
    out += std::string(i ? "; " : "") + insn[i].mnemonic + (insn[i].op_str[0] ? " " : "") + insn[i].op_str;
    size += insn[i].size;
  }
  if (insn) cs_free(insn, n);
  cs_close(&h);
  INFO(out);
  REQUIRE(size == bytes.size());  // every byte decodes as part of an instruction
  return out;
}

std::string hex(uint64_t v) { return fmt::format("{:#x}", v); }

// An RWX page of ours at (or near) `hint`; unmapped on destruction.
struct Page {
  uint8_t* p = nullptr;
  size_t len = 0;
  explicit Page(uint64_t hint = 0, size_t length = 4096) : len(length) {
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (hint ? MAP_FIXED_NOREPLACE : 0);
    void* m = ::mmap(reinterpret_cast<void*>(hint), len, PROT_READ | PROT_WRITE | PROT_EXEC, flags, -1, 0);
    if (m != MAP_FAILED) p = static_cast<uint8_t*>(m);
  }
  ~Page() {
    if (p) ::munmap(p, len);
  }
  uint64_t at(size_t off = 0) const { return reinterpret_cast<uint64_t>(p) + off; }
  void put(size_t off, const std::vector<uint8_t>& bytes) { std::memcpy(p + off, bytes.data(), bytes.size()); }
};
// A page `distance` bytes (roughly) above `base`, trying a few neighbours if one is taken.
std::unique_ptr<Page> page_at_distance(const Page& base, uint64_t distance) {
  for (uint64_t k = 0; k < 64; ++k) {
    auto pg = std::make_unique<Page>(base.at() + distance + k * (1ull << 24));
    if (pg->p) return pg;
  }
  return nullptr;
}

// f(x): lea rax, [rip -> data]; cmp edi, 0; jl neg; mov rax, [rax]; add rax, rdi; ret
//   neg: mov rax, [rax]; sub rax, rdi; sub rax, rdi; ret       data (at +0x100): 1000
// f(5) = 1005, f(-5) = 1010.
const std::vector<uint8_t> kF = {0x48, 0x8d, 0x05, 0xf9, 0x00, 0x00, 0x00, 0x83, 0xff, 0x00, 0x7c, 0x07,
                                 0x48, 0x8b, 0x00, 0x48, 0x01, 0xf8, 0xc3, 0x48, 0x8b, 0x00, 0x48, 0x29,
                                 0xf8, 0x48, 0x29, 0xf8, 0xc3};
// g(): call helper (+0x40: mov eax, 41; ret); add rax, 1; ret  ->  42
const std::vector<uint8_t> kG = {0xe8, 0x3b, 0x00, 0x00, 0x00, 0x48, 0x83, 0xc0, 0x01, 0xc3};
const std::vector<uint8_t> kHelper = {0xb8, 0x29, 0x00, 0x00, 0x00, 0xc3};
// h(x): test edi, edi; je +6 (-> +0xa); mov eax, 1; ret; mov eax, 2; ret  ->  h(0) = 2, h(1) = 1
const std::vector<uint8_t> kH = {0x85, 0xff, 0x74, 0x06, 0xb8, 0x01, 0x00, 0x00, 0x00,
                                 0xc3, 0xb8, 0x02, 0x00, 0x00, 0x00, 0xc3};

using Fn = int64_t (*)(int64_t);
Fn as_fn(uint64_t a) { return reinterpret_cast<Fn>(a); }

// Relocate `min` bytes of the code at src+off to dst, followed by a jump back; write it there.
Result<Relocation> move_with_jump_back(Page& src, size_t off, size_t size, Page& dst, size_t min) {
  auto r = relocate({src.p + off, size}, src.at(off), dst.at(), min);
  if (!r) return r;
  x86::Writer back(dst.at() + r->code.size());
  back.jmp(src.at(off) + r->consumed);
  dst.put(0, r->code);
  dst.put(r->code.size(), back.code());
  return r;
}

}  // namespace

TEST_CASE("writer: branches within and beyond rel32 reach") {
  const uint64_t at = 0x400000;
  {
    x86::Writer w(at);
    w.jmp(at + 0x1000);
    CHECK(w.code().size() == 5);
    CHECK(decode_all(w.code(), at) == "jmp " + hex(at + 0x1000));
  }
  {
    x86::Writer w(at);
    w.jmp(at + (1ull << 33));
    CHECK(w.code().size() == 14);
    CHECK(decode_all(std::span(w.code()).first(6), at) == "jmp qword ptr [rip]");
  }
  {
    x86::Writer w(at);
    w.call(at - 0x20);
    CHECK(decode_all(w.code(), at) == "call " + hex(at - 0x20));
    x86::Writer far(at);
    far.call(at + (1ull << 33));
    CHECK(far.code().size() == 16);
    CHECK(decode_all(std::span(far.code()).first(8), at) == "call qword ptr [rip + 2]; jmp " + hex(at + 16));
  }
  {
    x86::Writer w(at);
    w.jcc(x86::Cond::ne, at + 0x80);
    CHECK(w.code().size() == 6);
    CHECK(decode_all(w.code(), at) == "jne " + hex(at + 0x80));
    x86::Writer far(at);
    far.jcc(x86::Cond::ne, at + (1ull << 33));
    CHECK(far.code().size() == 16);
    CHECK(decode_all(std::span(far.code()).first(2), at) == "je " + hex(at + 16));
  }
  {
    x86::Writer w(at);
    REQUIRE(w.lock_inc_qword_ptr_rip(at + 0x2000));
    CHECK(decode_all(w.code(), at) == "lock inc qword ptr [rip + " + hex(0x2000 - 8) + "]");
    CHECK_FALSE(w.lock_inc_qword_ptr_rip(at + (1ull << 33)));
    CHECK(w.code().size() == 8);  // nothing written for the refused one
    w.push_rax(), w.mov_rax_u64(0x1122334455667788), w.lock_inc_qword_ptr_rax(), w.pop_rax();
    CHECK(decode_all(std::span(w.code()).subspan(8), at + 8) ==
          "push rax; movabs rax, 0x1122334455667788; lock inc qword ptr [rax]; pop rax");
  }
}

TEST_CASE("relocate: rip-relative operands keep their target, rel8 branches are widened") {
  const uint64_t from = 0x10000, to = 0x7000000;
  auto r = relocate(kF, from, to, 5);
  REQUIRE(r);
  CHECK(r->consumed == 7);  // the lea alone covers 5 bytes
  CHECK(decode_all(r->code, to) == "lea rax, [rip - " + hex(to + 7 - (from + 0x100)) + "]");
  auto r2 = relocate(kF, from, to, 12);
  REQUIRE(r2);
  CHECK(r2->consumed == 12);
  CHECK(r2->disasm == "lea rax, [rip + 0xf9]; cmp edi, 0; jl 0x10013");
  // jl rel8 becomes jl rel32 to the same target
  CHECK(decode_all(r2->code, to).ends_with("cmp edi, 0; jl " + hex(from + 0x13)));
  CHECK(r2->code.size() == 7 + 3 + 6);
  CHECK(r2->code.size() <= relocated_max_size(12));
}

TEST_CASE("relocate: refusals say why") {
  SECTION("a branch into the moved bytes") {
    std::vector<uint8_t> code = {0x74, 0x01, 0x90, 0x90, 0x90, 0x90, 0xc3};  // je +1 lands on moved byte 3
    auto r = relocate(code, 0x1000, 0x9000, 5);
    REQUIRE_FALSE(r);
    CHECK(r.error().what.find("branches to 0x1003, inside the 5 bytes being moved") != std::string::npos);
  }
  SECTION("a branch to the first byte is fine (it lands on what sits at the entry)") {
    std::vector<uint8_t> code = {0x90, 0x75, 0xfd, 0x90, 0x90, 0xc3};  // nop; jne -> +0
    auto r = relocate(code, 0x1000, 0x9000, 5);
    REQUIRE(r);
    CHECK(decode_all(r->code, 0x9000) == "nop; jne 0x1000; nop; nop");
  }
  SECTION("loop has no wider form") {
    std::vector<uint8_t> code = {0xe2, 0x10, 0x90, 0x90, 0x90, 0xc3};
    auto r = relocate(code, 0x1000, 0x9000, 5);
    REQUIRE_FALSE(r);
    CHECK(r.error().what.find("only an 8-bit displacement") != std::string::npos);
  }
  SECTION("xbegin") {
    std::vector<uint8_t> code = {0xc7, 0xf8, 0x10, 0x00, 0x00, 0x00, 0xc3};
    auto r = relocate(code, 0x1000, 0x9000, 5);
    REQUIRE_FALSE(r);
    CHECK(r.error().what.find("abort handler") != std::string::npos);
  }
  SECTION("a rip-relative operand out of reach") {
    auto r = relocate(kF, 0x10000, 0x10000 + (1ull << 33), 5);
    REQUIRE_FALSE(r);
    CHECK(r.error().what.find("beyond a 32-bit displacement") != std::string::npos);
  }
  SECTION("truncated or undecodable input") {
    std::vector<uint8_t> cut = {0x48, 0x8d, 0x05, 0xf9};
    auto r = relocate(cut, 0x1000, 0x9000, 5);
    REQUIRE_FALSE(r);
    CHECK(r.error().what.find("do not decode") != std::string::npos);
    std::vector<uint8_t> shortcode = {0x90, 0x90};
    auto s = relocate(shortcode, 0x1000, 0x9000, 5);
    REQUIRE_FALSE(s);
    CHECK(s.error().what.find("input ends there") != std::string::npos);
  }
  SECTION("a counting trampoline refuses a branch from the body into the covered bytes") {
    // lea (7 bytes covered); ...; jmp back to +3 (inside the lea)
    std::vector<uint8_t> code = {0x48, 0x8d, 0x05, 0x00, 0x00, 0x00, 0x00, 0x90, 0xeb, 0xf9, 0xc3};
    auto t = encode_counting_trampoline(code, 0x1000, 0x9000, 0x20000);
    REQUIRE_FALSE(t);
    CHECK(t.error().what.find("inside the 7 bytes the entry jump overwrites") != std::string::npos);
  }
}

TEST_CASE("relocated code runs at its new place (this process)") {
  Page a;
  REQUIRE(a.p);
  a.put(0, kF);
  uint64_t thousand = 1000;
  a.put(0x100, std::vector<uint8_t>(reinterpret_cast<uint8_t*>(&thousand), reinterpret_cast<uint8_t*>(&thousand) + 8));
  a.put(0x200, kG);
  a.put(0x240, kHelper);
  a.put(0x300, kH);
  REQUIRE(as_fn(a.at())(5) == 1005);
  REQUIRE(as_fn(a.at())(-5) == 1010);
  REQUIRE(as_fn(a.at(0x200))(0) == 42);
  REQUIRE(as_fn(a.at(0x300))(0) == 2);

  auto near = page_at_distance(a, 1ull << 30);  // 1 GiB: rel32 reach
  auto far = page_at_distance(a, 1ull << 34);   // 16 GiB: absolute forms
  INFO("pages at 1 GiB and 16 GiB from " << hex(a.at()));
  REQUIRE(near);
  REQUIRE(far);

  SECTION("rip-relative lea and a widened jl, within reach") {
    auto r = move_with_jump_back(a, 0, kF.size(), *near, 12);
    REQUIRE(r);
    CHECK(as_fn(near->at())(5) == 1005);
    CHECK(as_fn(near->at())(-5) == 1010);
  }
  SECTION("a call beyond reach: absolute call, and it returns into the moved code") {
    auto r = move_with_jump_back(a, 0x200, kG.size(), *far, 5);
    REQUIRE(r);
    CHECK(r->code.size() == 16);
    CHECK(as_fn(far->at())(0) == 42);
  }
  SECTION("a jcc beyond reach: inverted short jcc over an absolute jump") {
    auto r = move_with_jump_back(a, 0x300, kH.size(), *far, 5);
    REQUIRE(r);
    CHECK(as_fn(far->at())(0) == 2);
    CHECK(as_fn(far->at())(1) == 1);
  }
  SECTION("the rip-relative lea cannot go 16 GiB away") {
    auto r = move_with_jump_back(a, 0, kF.size(), *far, 5);
    REQUIRE_FALSE(r);
  }
}

namespace {

// Put a counting trampoline for the function at `fn` (size bytes, writable) at `tramp`,
// counting into `counter`, and the entry jump over fn. Returns the bytes it overwrote.
std::vector<uint8_t> install(uint64_t fn, size_t size, uint64_t tramp, uint64_t counter) {
  auto* code = reinterpret_cast<uint8_t*>(fn);
  auto t = encode_counting_trampoline({code, size}, fn, tramp, counter);
  INFO((t ? t->disasm : t.error().what));
  REQUIRE(t);
  REQUIRE(t->code.size() <= counting_trampoline_max_size());
  std::memcpy(reinterpret_cast<void*>(tramp), t->code.data(), t->code.size());
  auto jump = encode_entry_jump(fn, tramp);
  REQUIRE(jump);
  std::vector<uint8_t> saved(code, code + jump->size());
  std::memcpy(code, jump->data(), jump->size());
  return saved;
}

void make_writable(uint64_t addr, size_t len) {
  uint64_t page = static_cast<uint64_t>(::getpagesize());
  uint64_t begin = addr & ~(page - 1), end = (addr + len + page - 1) & ~(page - 1);
  REQUIRE(::mprotect(reinterpret_cast<void*>(begin), end - begin, PROT_READ | PROT_WRITE | PROT_EXEC) == 0);
}

}  // namespace

TEST_CASE("counting trampolines count every call exactly, from every thread") {
  Page a, counters;
  REQUIRE(a.p);
  REQUIRE(counters.p);
  a.put(0, kF);
  uint64_t thousand = 1000;
  std::memcpy(a.p + 0x100, &thousand, 8);
  auto tramp = page_at_distance(a, 1ull << 28);
  REQUIRE(tramp);
  auto far_counter = page_at_distance(a, 1ull << 35);

  for (bool in_reach : {true, false}) {
    if (!in_reach && !far_counter) continue;
    INFO((in_reach ? "counter in rip reach" : "counter 32 GiB away (movabs form)"));
    auto* slot = reinterpret_cast<std::atomic<uint64_t>*>(in_reach ? tramp->p + 0x800 : far_counter->p);
    slot->store(0);
    auto saved = install(a.at(), kF.size(), tramp->at(), reinterpret_cast<uint64_t>(slot));
    constexpr int kThreads = 4, kCalls = 10000;
    std::atomic<int64_t> wrong{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < kThreads; ++t)
      workers.emplace_back([&, t] {
        for (int i = 0; i < kCalls; ++i) {
          int64_t x = (i % 2 ? 1 : -1) * (t + i);
          int64_t want = x >= 0 ? 1000 + x : 1000 - 2 * x;
          if (as_fn(a.at())(x) != want) ++wrong;
        }
      });
    for (auto& w : workers) w.join();
    CHECK(wrong == 0);
    CHECK(slot->load() == uint64_t(kThreads) * kCalls);
    a.put(0, saved);
  }
}

TEST_CASE("counting trampolines on compiler-generated prologues (-O0 and -O2)") {
  for (const char* opt : {"O0", "O2"}) {
    INFO("-" << opt);
    void* lib = ::dlopen(test::fixture(std::string("arch_samples_") + opt + ".so").c_str(), RTLD_NOW | RTLD_LOCAL);
    REQUIRE(lib);
    auto ordinary = reinterpret_cast<int (*)(const int*, int)>(::dlsym(lib, "arch_ordinary"));
    auto reads = reinterpret_cast<int (*)()>(::dlsym(lib, "arch_reads_global"));
    auto bump = reinterpret_cast<void (*)()>(::dlsym(lib, "arch_bump_global"));
    REQUIRE((ordinary && reads && bump));
    // A trampoline must be within rel32 of its function: map one near the library.
    uint64_t lib_page = reinterpret_cast<uint64_t>(reads) & ~uint64_t(::getpagesize() - 1);
    auto near = std::make_unique<Page>(lib_page + (1ull << 26));
    if (!near->p) near = std::make_unique<Page>(lib_page - (1ull << 26));
    REQUIRE(near->p);
    auto* slots = reinterpret_cast<std::atomic<uint64_t>*>(near->p + 0x800);
    int v[5] = {1, 2, 3, 4, 5};
    int sum_before = ordinary(v, 5);
    int counter_before = reads();
    struct Installed {
      uint64_t fn;
      std::vector<uint8_t> saved;
    };
    std::vector<Installed> installed;
    size_t offset = 0, k = 0;
    for (void* fn : {reinterpret_cast<void*>(ordinary), reinterpret_cast<void*>(reads), reinterpret_cast<void*>(bump)}) {
      Dl_info info;
      ElfW(Sym)* sym = nullptr;
      REQUIRE(::dladdr1(fn, &info, reinterpret_cast<void**>(&sym), RTLD_DL_SYMENT));
      uint64_t at = reinterpret_cast<uint64_t>(fn);
      make_writable(at, sym->st_size);
      slots[k].store(0);
      installed.push_back({at, install(at, sym->st_size, near->at(offset), reinterpret_cast<uint64_t>(&slots[k]))});
      offset += counting_trampoline_max_size(), ++k;
    }
    for (int i = 0; i < 1000; ++i) {
      CHECK(ordinary(v, 5) == sum_before);
      bump();
    }
    CHECK(reads() == counter_before + 1000);
    CHECK(slots[0].load() == 1000);
    CHECK(slots[1].load() == 1);
    CHECK(slots[2].load() == 1000);
    for (auto& in : installed) std::memcpy(reinterpret_cast<void*>(in.fn), in.saved.data(), in.saved.size());
    ::dlclose(lib);
  }
}
