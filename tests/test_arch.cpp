// arch/x86_64 behind arch/arch.hpp: encodings checked by decoding them with Capstone,
// check_entry on real compiled (and hand-written) functions, the call/syscall register
// conventions, and register access on real ptrace-stopped processes.
#include <capstone/capstone.h>
#include <dlfcn.h>
#include <link.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>
#include <limits>
#include <thread>

#include "arch/arch.hpp"
#include "arch/x86_64/regs.hpp"
#include "support/harness.hpp"

using namespace hotfix;
using namespace hotfix::arch;

// Helpers a remote call lands in (same addresses in a forked child of this process).
extern "C" {
void hf_test_trap();
uint64_t hf_test_entry_sp();
uint64_t hf_test_read_xmm15();
void hf_test_clobber_xmm15();
__attribute__((noinline, used)) uint64_t hf_test_sum8(uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint64_t e,
                                                      uint64_t f, uint64_t g, uint64_t h) {
  return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h;
}
}
__asm__(
    ".text\n"
    ".globl hf_test_trap\n"
    "hf_test_trap: int3\n"
    ".globl hf_test_entry_sp\n"
    "hf_test_entry_sp: mov %rsp, %rax\n ret\n"
    ".globl hf_test_read_xmm15\n"
    "hf_test_read_xmm15: movq %xmm15, %rax\n ret\n"
    ".globl hf_test_clobber_xmm15\n"
    "hf_test_clobber_xmm15: pcmpeqd %xmm15, %xmm15\n ret\n");

namespace {

// ---- Capstone, independently of the code under test ----
struct Decoded {
  std::string mnemonic, op_str;
  size_t size = 0;
};
Decoded decode_first(std::span<const uint8_t> bytes, uint64_t address) {
  csh h;
  REQUIRE(cs_open(CS_ARCH_X86, CS_MODE_64, &h) == CS_ERR_OK);
  cs_insn* insn = nullptr;
  size_t n = cs_disasm(h, bytes.data(), bytes.size(), address, 1, &insn);
  Decoded d;
  if (n == 1) d = {insn->mnemonic, insn->op_str, insn->size};
  if (insn) cs_free(insn, n);
  cs_close(&h);
  REQUIRE(n == 1);
  return d;
}

// ---- fixture functions: bytes read from our own memory, size from the symbol ----
struct Sample {
  uint64_t address = 0;
  std::span<const uint8_t> code;
};
void* open_samples(const std::string& opt) {
  void* lib = ::dlopen(test::fixture("arch_samples_" + opt + ".so").c_str(), RTLD_NOW | RTLD_LOCAL);
  INFO(::dlerror());
  REQUIRE(lib);
  return lib;
}
Sample sample(void* lib, const char* name) {
  void* fn = ::dlsym(lib, name);
  INFO(name);
  REQUIRE(fn);
  Dl_info info;
  ElfW(Sym)* sym = nullptr;
  REQUIRE(::dladdr1(fn, &info, reinterpret_cast<void**>(&sym), RTLD_DL_SYMENT));
  REQUIRE(sym);
  REQUIRE(sym->st_size > 0);
  return {reinterpret_cast<uint64_t>(fn), {static_cast<const uint8_t*>(fn), sym->st_size}};
}
EntryCheck check(void* lib, const char* name) {
  auto s = sample(lib, name);
  auto c = check_entry(s.code, s.address);
  INFO(name << ": " << c.reason << " | " << c.disasm << " | " << c.note);
  return c;
}

// ---- real processes ----
// A fork of this test process (so our helper functions sit at the same addresses), parked in
// pause() and killed + reaped on destruction.
struct ForkedChild {
  pid_t pid = -1;
  ForkedChild() {
    pid_t parent = ::getpid();
    pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(1);
      for (;;) ::pause();
    }
  }
  ~ForkedChild() {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
};

// PTRACE_SEIZE + PTRACE_INTERRUPT: the thread stops in an event stop, as the patcher's does.
void seize_and_stop(pid_t pid) {
  REQUIRE(::ptrace(PTRACE_SEIZE, pid, nullptr, nullptr) == 0);
  REQUIRE(::ptrace(PTRACE_INTERRUPT, pid, nullptr, nullptr) == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSTOPPED(status));
  REQUIRE((status >> 16) == PTRACE_EVENT_STOP);
}

void write_memory(pid_t pid, uint64_t addr, const std::vector<uint8_t>& bytes) {
  iovec local{const_cast<uint8_t*>(bytes.data()), bytes.size()};
  iovec remote{reinterpret_cast<void*>(addr), bytes.size()};
  REQUIRE(::process_vm_writev(pid, &local, 1, &remote, 1, 0) == static_cast<ssize_t>(bytes.size()));
}

// Wait for the next stop; require it to be the trap our remote code ends on.
void wait_for_trap(pid_t pid) {
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  INFO("wait status 0x" << std::hex << status);
  REQUIRE(WIFSTOPPED(status));
  REQUIRE(WSTOPSIG(status) == SIGTRAP);
}

// Call fn(args) in the stopped child, starting from `saved`; returns its return value.
uint64_t remote_call(pid_t pid, const RegsBuffer& saved, void (*fn)(), std::vector<uint64_t> args = {},
                     CallFrame* frame_out = nullptr) {
  RegsBuffer r = saved;
  uint64_t trap = reinterpret_cast<uint64_t>(&hf_test_trap);
  CallFrame frame = regs__prepare_call(r, reinterpret_cast<uint64_t>(fn), args, trap);
  write_memory(pid, frame.sp, frame.stack_bytes);
  REQUIRE(regs__write(pid, r));
  REQUIRE(::ptrace(PTRACE_CONT, pid, nullptr, nullptr) == 0);
  wait_for_trap(pid);
  RegsBuffer after;
  REQUIRE(regs__read(pid, after));
  REQUIRE(regs__pc(after) == pc_after_trap(trap));
  REQUIRE(regs__sp(after) == frame.sp + 8);  // `ret` popped our return address
  if (frame_out) *frame_out = frame;
  return regs__return_value(after);
}
template <typename F>
void (*as_fn(F* f))() {
  return reinterpret_cast<void (*)()>(f);
}

// First field of /proc/pid/syscall: the syscall number it is blocked in, or "running".
std::string blocked_in(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/syscall");
  std::string first;
  in >> first;
  return first;
}
// Poll until `pid` blocks in one of `nrs` (guard against hanging, not a timing assertion).
bool wait_blocked_in(pid_t pid, std::initializer_list<long> nrs) {
  for (int i = 0; i < 20000; ++i) {
    auto s = blocked_in(pid);
    for (long nr : nrs)
      if (s == std::to_string(nr)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

}  // namespace

TEST_CASE("arch name and instruction bytes") {
  CHECK(std::string(name()) == "x86_64");
  CHECK(decode_first(syscall_instruction(), 0x1000).mnemonic == "syscall");
  CHECK(decode_first(trap_instruction(), 0x1000).mnemonic == "int3");
  CHECK(pc_after_trap(0x1000) == 0x1000 + trap_instruction().size());
}

TEST_CASE("entry jump encodes a jmp to the target, within reach only") {
  const uint64_t from = 0x7f0000000000;
  for (uint64_t to : {from + 0x1234, from - 0x1234, from, from + 5, from - 0x7fff0000}) {
    auto bytes = encode_entry_jump(from, to);
    REQUIRE(bytes);
    REQUIRE(bytes->size() == entry_jump_size());
    auto d = decode_first(*bytes, from);
    CHECK(d.size == entry_jump_size());
    CHECK(d.mnemonic == "jmp");
    CHECK(d.op_str == fmt::format("0x{:x}", to));
  }

  SECTION("the reach boundary is exact on both sides") {
    const uint64_t end = from + entry_jump_size();  // rel32 counts from here
    const uint64_t max_fwd = end + INT32_MAX, max_back = end - (uint64_t{1} << 31);
    REQUIRE(encode_entry_jump(from, max_fwd));
    CHECK(decode_first(*encode_entry_jump(from, max_fwd), from).op_str == fmt::format("0x{:x}", max_fwd));
    REQUIRE(encode_entry_jump(from, max_back));
    CHECK(decode_first(*encode_entry_jump(from, max_back), from).op_str == fmt::format("0x{:x}", max_back));
    CHECK_FALSE(encode_entry_jump(from, max_fwd + 1));
    CHECK_FALSE(encode_entry_jump(from, max_back - 1));
    CHECK_FALSE(encode_entry_jump(0x1000, 0x7f0000000000));
    CHECK(near_jump_reach() == INT32_MAX);
  }
}

TEST_CASE("island jump is an absolute indirect jmp through the next 8 bytes") {
  const uint64_t island = 0x7f1234560000, to = 0x55aa00112233;
  auto bytes = encode_island_jump(island, to);
  REQUIRE(bytes.size() == island_jump_size());
  auto d = decode_first(bytes, island);
  CHECK(d.mnemonic == "jmp");
  CHECK(d.op_str == "qword ptr [rip]");
  REQUIRE(d.size + 8 == bytes.size());
  uint64_t target = 0;
  std::memcpy(&target, bytes.data() + d.size, 8);  // x86_64 is little-endian, like the encoding
  CHECK(target == to);
}

TEST_CASE("check_entry on compiled functions (-O0 and -O2)") {
  for (const char* opt : {"O0", "O2"}) {
    INFO("-" << opt);
    void* lib = open_samples(opt);
    for (const char* fn : {"arch_ordinary", "arch_reads_global", "arch_bump_global"}) {
      auto c = check(lib, fn);
      CHECK(c.patchable);
      CHECK(c.reason.empty());
      CHECK(c.covered >= entry_jump_size());
      CHECK_FALSE(c.disasm.empty());
    }
    if (std::string(opt) == "O0") CHECK(check(lib, "arch_ordinary").disasm.starts_with("push rbp; mov rbp, rsp"));
    if (std::string(opt) == "O2") {
      // `mov eax, dword ptr [rip + x]` first: reported, not refused.
      auto c = check(lib, "arch_reads_global");
      CHECK(c.rip_relative);
      CHECK(c.disasm.starts_with("mov eax, dword ptr [rip + "));
      CHECK(c.note.find("pc-relative") != std::string::npos);
    }
    ::dlclose(lib);
  }
}

TEST_CASE("check_entry on hand-written shapes") {
  void* lib = open_samples("O2");

  SECTION("shorter than the jump") {
    for (const char* fn : {"arch_tiny_ret", "arch_tiny3"}) {
      auto c = check(lib, fn);
      CHECK_FALSE(c.patchable);
      CHECK(c.reason.find("shorter than the 5-byte entry jump") != std::string::npos);
    }
    CHECK(check(lib, "arch_tiny3").reason.starts_with("the 3-byte function"));
  }
  SECTION("exactly five bytes of whole instructions") {
    auto c = check(lib, "arch_exactly5");
    CHECK(c.patchable);
    CHECK(c.covered == 5);
    CHECK(c.disasm == "xor eax, eax; inc eax; ret");
  }
  SECTION("an instruction under the jump runs past the function's end") {
    auto c = check(lib, "arch_truncated");
    CHECK_FALSE(c.patchable);
    CHECK(c.reason == "the instruction at +2 runs past the end of the 5-byte function");
  }
  SECTION("a loop back into the overwritten bytes") {
    auto c = check(lib, "arch_loop_into_entry");
    CHECK_FALSE(c.patchable);
    CHECK(c.reason.find("branches to +2, inside the 5 bytes the entry jump overwrites") != std::string::npos);
    CHECK(c.reason.starts_with("`jl 0x"));
  }
  SECTION("a call into the overwritten bytes") {
    auto c = check(lib, "arch_call_into_entry");
    CHECK_FALSE(c.patchable);
    CHECK(c.reason.find("branches to +1") != std::string::npos);
  }
  SECTION("a loop back to the entry itself is fine") {
    auto c = check(lib, "arch_loop_to_entry");
    CHECK(c.patchable);
    CHECK(c.covered == 5);
    CHECK(c.disasm == "sub edi, 1; test edi, edi");
  }
  SECTION("invalid bytes under the jump") {
    auto c = check(lib, "arch_bad_bytes");
    CHECK_FALSE(c.patchable);
    CHECK(c.reason.find("at +1") != std::string::npos);
    CHECK(c.reason.find("not a valid instruction") != std::string::npos);
  }
  SECTION("endbr64 at the entry is overwritten like any instruction") {
    auto c = check(lib, "arch_endbr");
    CHECK(c.patchable);
    CHECK(c.disasm == "endbr64; push rbp");
  }
  SECTION("an indirect jump is reported, not refused") {
    auto c = check(lib, "arch_indirect");
    CHECK(c.patchable);
    CHECK(c.indirect_branches);
    CHECK(c.note.find("indirect") != std::string::npos);
  }
  SECTION("undecodable bytes after the covered range are skipped and noted") {
    auto c = check(lib, "arch_trailing_data");
    CHECK(c.patchable);
    CHECK(c.note.find("did not decode") != std::string::npos);
  }
  ::dlclose(lib);
}

TEST_CASE("disassemble lists instructions with addresses") {
  const uint8_t code[] = {0x55, 0x48, 0x89, 0xe5, 0xc3, 0x06};
  CHECK(disassemble(code, 0x401000) == "0x401000: push rbp\n0x401001: mov rbp, rsp\n0x401004: ret\n0x401005: (bad)\n");
  CHECK(disassemble(code, 0x401000, 2) == "0x401000: push rbp\n0x401001: mov rbp, rsp\n");
}

TEST_CASE("prepare_call: System V registers, aligned stack, red zone untouched") {
  const uint64_t fn = 0x401000, trap = 0x402000;
  for (uint64_t old_sp = 0x7ffd00001000; old_sp < 0x7ffd00001000 + 32; ++old_sp) {
    for (size_t nargs : {0, 3, 6, 7, 8, 9}) {
      INFO("old sp 0x" << std::hex << old_sp << " args " << std::dec << nargs);
      RegsBuffer r{};
      r.get().u.rsp = old_sp;
      r.get().u.orig_rax = 7;
      std::vector<uint64_t> args;
      for (size_t i = 0; i < nargs; ++i) args.push_back(0x1000 + i);
      CallFrame f = regs__prepare_call(r, fn, args, trap);
      const auto& u = r.get().u;
      CHECK(f.sp == u.rsp);
      CHECK((f.sp + 8) % 16 == 0);                       // ABI alignment at the callee's entry
      CHECK(f.sp + f.stack_bytes.size() <= old_sp - 128);  // red zone untouched
      CHECK(u.rip == fn);
      CHECK(u.rax == 0);
      CHECK(static_cast<long>(u.orig_rax) == -1);
      uint64_t ret = 0;
      REQUIRE(f.stack_bytes.size() == 8 * (1 + (nargs > 6 ? nargs - 6 : 0)));
      std::memcpy(&ret, f.stack_bytes.data(), 8);
      CHECK(ret == trap);
      const unsigned long long in_regs[] = {u.rdi, u.rsi, u.rdx, u.rcx, u.r8, u.r9};
      for (size_t i = 0; i < nargs; ++i) {
        uint64_t v = 0;
        if (i < 6) v = in_regs[i];
        else std::memcpy(&v, f.stack_bytes.data() + 8 * (i - 5), 8);  // [rsp+8], [rsp+16], ...
        CHECK(v == 0x1000 + i);
      }
    }
  }
}

TEST_CASE("prepare_syscall: number, arguments, gadget, restart disarmed") {
  RegsBuffer r{};
  r.get().u.orig_rax = 230;
  r.get().u.rax = static_cast<uint64_t>(-516);
  REQUIRE(regs__in_restartable_syscall(r));
  const uint64_t args[] = {1, 2, 3, 4, 5, 6};
  regs__prepare_syscall(r, 0x7000, SYS_mmap, args);
  const auto& u = r.get().u;
  CHECK(u.rax == SYS_mmap);
  CHECK(u.rip == 0x7000);
  CHECK(std::vector<uint64_t>{u.rdi, u.rsi, u.rdx, u.r10, u.r8, u.r9} == std::vector<uint64_t>{1, 2, 3, 4, 5, 6});
  CHECK_FALSE(regs__in_restartable_syscall(r));
  r.get().u.rax = static_cast<uint64_t>(-ENOMEM);
  CHECK(regs__syscall_result(r) == -ENOMEM);
  CHECK(max_syscall_args() == 6);
}

TEST_CASE("restartable syscall detection and manual restart") {
  RegsBuffer r{};
  r.get().u.rip = 0x5000;
  for (long err : {512, 513, 514, 516}) {
    r.get().u.orig_rax = SYS_read;
    r.get().u.rax = static_cast<uint64_t>(-err);
    CHECK(regs__in_restartable_syscall(r));
  }
  r.get().u.rax = static_cast<uint64_t>(-EINTR);  // a real error: returned to the program
  CHECK_FALSE(regs__in_restartable_syscall(r));
  r.get().u.orig_rax = static_cast<uint64_t>(-1);  // not in a syscall
  r.get().u.rax = static_cast<uint64_t>(-512);
  CHECK_FALSE(regs__in_restartable_syscall(r));

  r.get().u.orig_rax = SYS_read;
  regs__restart_syscall(r);
  CHECK(r.get().u.rip == 0x5000 - 2);
  CHECK(r.get().u.rax == SYS_read);
  CHECK(static_cast<long>(r.get().u.orig_rax) == -1);

  r.get().u = {};
  r.get().u.rip = 0x5000, r.get().u.orig_rax = SYS_clock_nanosleep, r.get().u.rax = static_cast<uint64_t>(-516);
  regs__restart_syscall(r);
  CHECK(r.get().u.rax == SYS_restart_syscall);  // the kernel resumes via its restart block
  CHECK(r.get().u.rip == 0x4ffe);
}

TEST_CASE("dwarf register order") {
  RegsBuffer r{};
  auto& u = r.get().u;
  u.rax = 0, u.rdx = 1, u.rcx = 2, u.rbx = 3, u.rsi = 4, u.rdi = 5, u.rbp = 6, u.rsp = 7;
  u.r8 = 8, u.r9 = 9, u.r10 = 10, u.r11 = 11, u.r12 = 12, u.r13 = 13, u.r14 = 14, u.r15 = 15, u.rip = 16;
  auto d = regs__dwarf(r);
  REQUIRE(d.size() == 17);
  for (uint64_t i = 0; i < d.size(); ++i) CHECK(d[i] == i);
  CHECK(regs__dwarf_pc_register() == 16);
}

TEST_CASE("registers round-trip through ptrace on a real process") {
  ForkedChild child;
  SECTION("not traced: a clear error naming the thread") {
    RegsBuffer r;
    auto res = regs__read(child.pid, r);
    REQUIRE_FALSE(res);
    CHECK(res.error().what.find("thread " + std::to_string(child.pid)) != std::string::npos);
    CHECK_FALSE(res.error().hint.empty());
  }
  SECTION("read, modify, write, read again") {
    seize_and_stop(child.pid);
    RegsBuffer before;
    REQUIRE(regs__read(child.pid, before));
    CHECK(regs__pc(before) != 0);
    CHECK(regs__sp(before) != 0);
    RegsBuffer changed = before;
    changed.get().u.r12 = 0x1122334455667788;
    changed.get().u.r13 = ~before.get().u.r13;
    regs__set_pc(changed, reinterpret_cast<uint64_t>(&hf_test_trap));
    REQUIRE(regs__write(child.pid, changed));
    RegsBuffer after;
    REQUIRE(regs__read(child.pid, after));
    CHECK(after.get().u.r12 == 0x1122334455667788);
    CHECK(after.get().u.r13 == ~before.get().u.r13);
    CHECK(regs__pc(after) == reinterpret_cast<uint64_t>(&hf_test_trap));
    CHECK(std::memcmp(&after.get().u, &changed.get().u, sizeof(user_regs_struct)) == 0);
  }
}

TEST_CASE("remote function calls: arguments, alignment, stack, FP state") {
  ForkedChild child;
  seize_and_stop(child.pid);
  RegsBuffer saved;
  REQUIRE(regs__read(child.pid, saved));
  auto saved_ext = regs__read_extended(child.pid);
  REQUIRE(saved_ext);
  CHECK(saved_ext->bytes.size() >= 512 + 64);  // legacy FXSAVE area + XSAVE header at least

  const uint64_t old_sp = regs__sp(saved);
  auto red_zone_before = test::read_memory(child.pid, old_sp - 128, 128);

  SECTION("eight integer arguments, two on the stack") {
    uint64_t got = remote_call(child.pid, saved, as_fn(&hf_test_sum8), {1, 2, 3, 4, 5, 6, 7, 8});
    CHECK(got == 1 + 4 + 9 + 16 + 25 + 36 + 49 + 64);
  }
  SECTION("the callee sees an ABI-aligned stack") {
    CallFrame frame;
    uint64_t entry_sp = remote_call(child.pid, saved, as_fn(&hf_test_entry_sp), {}, &frame);
    CHECK(entry_sp == frame.sp);
    CHECK((entry_sp + 8) % 16 == 0);
  }
  SECTION("FP/vector registers clobbered by a call are restored") {
    uint64_t original = remote_call(child.pid, saved, as_fn(&hf_test_read_xmm15));
    REQUIRE(original != ~uint64_t{0});
    remote_call(child.pid, saved, as_fn(&hf_test_clobber_xmm15));
    CHECK(remote_call(child.pid, saved, as_fn(&hf_test_read_xmm15)) == ~uint64_t{0});
    REQUIRE(regs__write_extended(child.pid, *saved_ext));
    CHECK(remote_call(child.pid, saved, as_fn(&hf_test_read_xmm15)) == original);
  }
  CHECK(test::read_memory(child.pid, old_sp - 128, 128) == red_zone_before);
  // Put the thread back as it was; it resumes its pause().
  REQUIRE(regs__write(child.pid, saved));
  RegsBuffer back;
  REQUIRE(regs__read(child.pid, back));
  CHECK(std::memcmp(&back.get().u, &saved.get().u, sizeof(user_regs_struct)) == 0);
}

TEST_CASE("remote syscall in a thread stopped in an interrupted sleep, then the sleep resumes") {
  test::Child sleeper({"/bin/sleep", "1000"});
  REQUIRE(wait_blocked_in(sleeper.pid(), {SYS_clock_nanosleep, SYS_nanosleep}));
  seize_and_stop(sleeper.pid());
  RegsBuffer saved;
  REQUIRE(regs__read(sleeper.pid(), saved));
  INFO("orig_rax " << static_cast<long>(saved.get().u.orig_rax) << " rax " << static_cast<long>(saved.get().u.rax));
  REQUIRE(regs__in_restartable_syscall(saved));

  // The thread stopped right after its syscall instruction: use it as the gadget.
  const uint64_t gadget = regs__pc(saved) - syscall_instruction().size();
  auto at_gadget = test::read_memory(sleeper.pid(), gadget, syscall_instruction().size());
  REQUIRE(std::equal(at_gadget.begin(), at_gadget.end(), syscall_instruction().begin()));

  RegsBuffer r = saved;
  regs__prepare_syscall(r, gadget, SYS_getpid, {});
  REQUIRE(regs__write(sleeper.pid(), r));
  REQUIRE(::ptrace(PTRACE_SINGLESTEP, sleeper.pid(), nullptr, nullptr) == 0);
  wait_for_trap(sleeper.pid());
  RegsBuffer after;
  REQUIRE(regs__read(sleeper.pid(), after));
  CHECK(regs__syscall_result(after) == sleeper.pid());
  CHECK(regs__pc(after) == regs__pc(saved));

  SECTION("writing back the saved registers: the kernel restarts the sleep") {
    REQUIRE(regs__write(sleeper.pid(), saved));
  }
  SECTION("restarting by hand (as after a syscall-exit stop)") {
    RegsBuffer manual = saved;
    regs__restart_syscall(manual);
    CHECK_FALSE(regs__in_restartable_syscall(manual));
    REQUIRE(regs__write(sleeper.pid(), manual));
  }
  REQUIRE(::ptrace(PTRACE_DETACH, sleeper.pid(), nullptr, nullptr) == 0);
  // Had the restart gone wrong, sleep would see an error (or errno 516) and exit.
  CHECK(wait_blocked_in(sleeper.pid(), {SYS_restart_syscall, SYS_clock_nanosleep, SYS_nanosleep}));
  CHECK(sleeper.running());
}
