// The pattern language on hand-built Function records (no process needed).
#include <catch2/catch.hpp>

#include "common/json.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;

namespace {

Function fn(std::string name, std::string mangled, uint64_t address, std::string object = "/opt/app/bin/app",
            Binding binding = Binding::global) {
  Function f;
  f.name = std::move(name);
  f.mangled = std::move(mangled);
  f.address = address;
  f.offset = address & 0xffff;
  f.size = 16;
  f.object = std::move(object);
  f.binding = binding;
  return f;
}

SymbolTable sample() {
  return SymbolTable::from_records({
      fn("pricing::discount(double)", "_ZN7pricing8discountEd", 0x1000),
      fn("pricing::discount_vip(double)", "_ZN7pricing12discount_vipEd", 0x1010),
      fn("pricing::detail::round_cents(double)", "_ZN7pricing6detail11round_centsEd", 0x1020),
      fn("Order::add(int)", "_ZN5Order3addEi", 0x1030, "/opt/app/bin/app", Binding::weak),
      fn("Order::add(double)", "_ZN5Order3addEd", 0x1040, "/opt/app/bin/app", Binding::weak),
      fn("Order::total() const", "_ZNK5Order5totalEv", 0x1050),
      fn("Order::operator()(int) const", "_ZNK5OrderclEi", 0x1060),
      fn("int max_of<int>(int, int)", "_Z6max_ofIiET_S0_S0_", 0x1070),
      fn("(anonymous namespace)::anon_helper(int)", "_ZN12_GLOBAL__N_111anon_helperEi", 0x1080, "/opt/app/bin/app",
         Binding::local),
      fn("non-virtual thunk to Order::total() const", "_ZThn8_NK5Order5totalEv", 0x1090),
      fn("Order::total() const [clone .cold]", "_ZNK5Order5totalEv.cold", 0x10a0, "/opt/app/bin/app", Binding::local),
      fn("parse_config(Parser&)", "_Z12parse_configR6Parser", 0x10b0),
      fn("use(Parser&)", "_Z3useR6Parser", 0x10c0),
      fn("c_add", "c_add", 0x10d0),
      fn("shapes::area(double, double)", "_ZN6shapes4areaEdd", 0x7f0000001000, "/opt/app/lib/libshapes.so.1"),
      fn("shapes_version", "shapes_version", 0x7f0000001010, "/opt/app/lib/libshapes.so.1"),
      fn("c_add", "c_add", 0x7f0000002000, "/usr/lib/libother.so"),
  });
}

std::vector<std::string> names(const std::vector<Function>& fs) {
  std::vector<std::string> out;
  for (auto& f : fs) out.push_back(f.name);
  return out;
}

std::vector<std::string> select_names(const std::vector<std::string>& patterns, const SelectOptions& opts = {}) {
  static const SymbolTable table = sample();
  auto r = symbols__select(table, patterns, opts);
  if (!r) FAIL("select failed: " << r.error().line());
  return names(*r);
}

using V = std::vector<std::string>;

}  // namespace

TEST_CASE("demangled names split into base name and signature") {
  auto check = [](const char* demangled, const char* base, const char* signature) {
    auto parts = symbols__split_name(demangled);
    CHECK(parts.base == base);
    CHECK(parts.signature == signature);
  };
  check("c_add", "c_add", "c_add");
  check("pricing::discount(double)", "pricing::discount", "pricing::discount(double)");
  check("Order::total() const", "Order::total", "Order::total() const");
  check("Order::get() const &&", "Order::get", "Order::get() const &&");
  check("int max_of<int>(int, int)", "max_of<int>", "max_of<int>(int, int)");
  check("Order::operator()(int) const", "Order::operator()", "Order::operator()(int) const");
  check("(anonymous namespace)::anon_helper(int)", "(anonymous namespace)::anon_helper",
        "(anonymous namespace)::anon_helper(int)");
  check("operator new(unsigned long)", "operator new", "operator new(unsigned long)");
  check("bool operator< <int>(Box<int> const&, Box<int> const&)", "operator< <int>",
        "operator< <int>(Box<int> const&, Box<int> const&)");
  check("Foo::operator char const*() const", "Foo::operator char const*", "Foo::operator char const*() const");
  check("main::{lambda(int)#1}::operator()(int) const", "main::{lambda(int)#1}::operator()",
        "main::{lambda(int)#1}::operator()(int) const");
  check("std::vector<int, std::allocator<int> >::size() const", "std::vector<int, std::allocator<int> >::size",
        "std::vector<int, std::allocator<int> >::size() const");
  check("std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> > make_name[abi:cxx11](int)",
        "make_name", "make_name[abi:cxx11](int)");
  check("foo(int) [clone .cold]", "foo [clone .cold]", "foo(int) [clone .cold]");
  check("non-virtual thunk to Order::total() const", "non-virtual thunk to Order::total() const",
        "non-virtual thunk to Order::total() const");
  check("(anonymous namespace)::counter", "(anonymous namespace)::counter", "(anonymous namespace)::counter");
}

TEST_CASE("exact names: base name, mangled name, one overload by its parameters") {
  CHECK(select_names({"pricing::discount"}) == V{"pricing::discount(double)"});
  CHECK(select_names({"_ZN7pricing8discountEd"}) == V{"pricing::discount(double)"});
  CHECK(select_names({"Order::add"}) == V{"Order::add(int)", "Order::add(double)"});
  CHECK(select_names({"Order::add(int)"}) == V{"Order::add(int)"});
  CHECK(select_names({"Order::add( double )"}) == V{"Order::add(double)"});
  // Qualifiers may be left out, or given.
  CHECK(select_names({"Order::total()"}) == V{"Order::total() const"});
  CHECK(select_names({"Order::total() const"}) == V{"Order::total() const"});
  CHECK(select_names({"Order::total"}) == V{"Order::total() const"});  // not the thunk, not the .cold clone
  CHECK(select_names({"Order::operator()"}) == V{"Order::operator()(int) const"});
  CHECK(select_names({"max_of<int>"}) == V{"int max_of<int>(int, int)"});
  CHECK(select_names({"max_of<int>(int,int)"}) == V{"int max_of<int>(int, int)"});
  CHECK(select_names({"int max_of<int>(int, int)"}) == V{"int max_of<int>(int, int)"});
  CHECK(select_names({"(anonymous namespace)::anon_helper"}) == V{"(anonymous namespace)::anon_helper(int)"});
  // A C name in two objects is two functions.
  CHECK(select_names({"c_add"}).size() == 2);
}

TEST_CASE("globs: namespace, class, fragment") {
  CHECK(select_names({"pricing::*"}) ==
        V{"pricing::discount(double)", "pricing::discount_vip(double)", "pricing::detail::round_cents(double)"});
  CHECK(select_names({"Order::*"}) == V{"Order::add(int)", "Order::add(double)", "Order::total() const",
                                         "Order::operator()(int) const", "Order::total() const [clone .cold]"});
  CHECK(select_names({"*discount*"}) == V{"pricing::discount(double)", "pricing::discount_vip(double)"});
  CHECK(select_names({"pricing::discount_???"}) == V{"pricing::discount_vip(double)"});
  // Parameter types do not make a fragment match; a glob with '(' looks at signatures.
  CHECK(select_names({"*parse*"}) == V{"parse_config(Parser&)"});
  CHECK(select_names({"*(Parser&)"}) == V{"parse_config(Parser&)", "use(Parser&)"});
  CHECK(select_names({"Order::add(*)"}) == V{"Order::add(int)", "Order::add(double)"});
  CHECK(select_names({"_ZN7pricing*"}).size() == 3);
  CHECK(select_names({"max_of<*>"}) == V{"int max_of<int>(int, int)"});
}

TEST_CASE("several patterns: address order, each function once") {
  CHECK(select_names({"pricing::discount_vip", "pricing::*", "pricing::discount"}) ==
        V{"pricing::discount(double)", "pricing::discount_vip(double)", "pricing::detail::round_cents(double)"});
}

TEST_CASE("--object by basename, by basename before '.', by path") {
  CHECK(select_names({"c_add"}, {"libother.so"}).size() == 1);
  CHECK(select_names({"*"}, {"libshapes.so.1"}) == V{"shapes::area(double, double)", "shapes_version"});
  CHECK(select_names({"*"}, {"libshapes.so"}) == V{"shapes::area(double, double)", "shapes_version"});
  CHECK(select_names({"*"}, {"libshapes"}) == V{"shapes::area(double, double)", "shapes_version"});
  CHECK(select_names({"c_add"}, {"/opt/app/bin/app"}).size() == 1);
  CHECK(select_names({"c_add"}, {"app"}).size() == 1);
  CHECK_FALSE(symbols__object_matches("/opt/app/lib/libshapes.so.1", "libshape"));
  CHECK_FALSE(symbols__object_matches("/opt/app/lib/libshapes.so.1", "/lib/libshapes.so.1"));
  CHECK(symbols__object_matches("/opt/app/lib/libshapes.so.1 (deleted)", "libshapes.so"));

  auto r = symbols__select(sample(), {"c_add"}, {"libshapez.so"});
  REQUIRE_FALSE(r);
  CHECK(r.error().what == "no object 'libshapez.so' is loaded in the symbol table");
  CHECK(r.error().hint == "did you mean 'libshapes.so.1'?");
  // A name that exists, but not in the object asked for.
  auto elsewhere = symbols__select(sample(), {"pricing::discount"}, {"libshapes.so"});
  REQUIRE_FALSE(elsewhere);
}

TEST_CASE("a pattern that matches nothing is an error suggesting the nearest names") {
  auto table = sample();
  auto r = symbols__select(table, {"pricing::discount", "pricing::discont"});
  REQUIRE_FALSE(r);
  CHECK(r.error().exit_code == 1);
  CHECK(r.error().what == "no function matches 'pricing::discont' in the symbol table (searched 17 functions)");
  CHECK(r.error().hint == "did you mean 'pricing::discount' or 'pricing::discount_vip'?");

  // Unqualified: the last component counts.
  CHECK(symbols__nearest(table, "discont").front() == "pricing::discount");
  // A fragment contained in names.
  CHECK(symbols__nearest(table, "round").front() == "pricing::detail::round_cents");
  // A parameter list no overload has: the overloads are offered.
  auto overload = symbols__select(table, {"Order::add(long)"});
  REQUIRE_FALSE(overload);
  CHECK(overload.error().hint == "did you mean 'Order::add(double)' or 'Order::add(int)'?");
  // Nothing close: no suggestion, but still a hint.
  auto far = symbols__select(table, {"zzzzqqqq"});
  REQUIRE_FALSE(far);
  CHECK(far.error().hint.find("did you mean") == std::string::npos);
  CHECK_FALSE(far.error().hint.empty());
  // Globs that match nothing fail the same way.
  CHECK_FALSE(symbols__select(table, {"billing::*"}));
  CHECK(symbols__select(table, {""}).error().exit_code == 2);
}

TEST_CASE("aliases answer to patterns too") {
  auto f = fn("malloc", "malloc", 0x2000, "/usr/lib/libc.so.6");
  f.aliases = {"__libc_malloc", "_ZN3mem5allocEm"};
  CHECK(Pattern::parse("malloc").matches(f));
  CHECK(Pattern::parse("__libc_malloc").matches(f));
  CHECK(Pattern::parse("mem::alloc").matches(f));
  CHECK(Pattern::parse("mem::alloc(unsigned long)").matches(f));
  CHECK_FALSE(Pattern::parse("calloc").matches(f));
  CHECK(Pattern::parse("*libc_*").is_glob());
  CHECK(Pattern::parse("*libc_*").matches(f));
}

TEST_CASE("JSON strings are escaped") {
  CHECK(json__quote("plain") == "\"plain\"");
  CHECK(json__quote("a\"b\\c") == "\"a\\\"b\\\\c\"");
  CHECK(json__quote("line\nnext\ttab") == "\"line\\nnext\\ttab\"");
  CHECK(json__quote(std::string("\x01", 1)) == "\"\\u0001\"");
  CHECK(json__quote("caf\xc3\xa9") == "\"caf\xc3\xa9\"");
}

TEST_CASE("Rust names demangle without the hash, like rustfilt (legacy and v0)") {
  CHECK(symbols__demangle("_ZN4main7pricing8discount17h0ab45471d63b9820E") == "main::pricing::discount");
  CHECK(symbols__demangle("_ZN4main7pricing8discount17h0ab45471d63b9820E.llvm.1234") == "main::pricing::discount");
  CHECK(symbols__demangle("_RNvNtCsddXRGQ8mmyB_4main7pricing8discount") == "main::pricing::discount");
  CHECK(symbols__demangle("_RNvMNtCsddXRGQ8mmyB_4main7pricingNtB2_5Order5total") == "<main::pricing::Order>::total");
  CHECK(symbols__demangle("_ZN36_$LT$T$u20$as$u20$core..any..Any$GT$7type_id17h0976df0ec15ad1bfE") ==
        "<T as core::any::Any>::type_id");
  CHECK(symbols__rust_hashed("_ZN4main7pricing8discount17h0ab45471d63b9820E") ==
        "main::pricing::discount::h0ab45471d63b9820");
  // C++ names are not Rust: a C++ `pricing::discount` variable (no parameters) keeps its name.
  CHECK_FALSE(symbols__is_rust("_ZN7pricing8discountE"));
  CHECK(symbols__demangle("_ZN7pricing8discountEd") == "pricing::discount(double)");
  CHECK(symbols__is_rust("_RNvNtCsddXRGQ8mmyB_4main7pricing8discount"));
  CHECK_FALSE(symbols__is_rust("_Rfoo"));  // a C name that happens to start with _R
}

TEST_CASE("Rust paths: hash-less, crate-less globs, inherent methods, generic instances") {
  auto rust = [](std::string mangled, uint64_t at) { return fn(symbols__demangle(mangled), mangled, at); };
  auto table = SymbolTable::from_records({
      rust("_ZN4main7pricing8discount17h0ab45471d63b9820E", 0x1000),
      rust("_RNvNtCsddXRGQ8mmyB_5other7pricing8discount", 0x1010),  // v0, another crate
      rust("_RNvMNtCsddXRGQ8mmyB_4main7pricingNtB2_5Order5total", 0x1020),
      rust("_RINvNtCsddXRGQ8mmyB_4main7pricing7generichEB4_", 0x1030),
      rust("_ZN4main7pricing12discount_vip17h1111111111111111E", 0x1040),
      rust("_ZN4main4util5round17h2222222222222222E", 0x1050),
      fn("c_add", "c_add", 0x1060),
  });
  auto pick = [&](std::vector<std::string> patterns) {
    auto r = symbols__select(table, patterns);
    if (!r) FAIL("select failed: " << r.error().line());
    return names(*r);
  };
  CHECK(pick({"main::pricing::discount"}) == V{"main::pricing::discount"});
  CHECK(pick({"main::pricing::discount::h0ab45471d63b9820"}) == V{"main::pricing::discount"});
  CHECK(pick({"other::pricing::discount"}) == V{"other::pricing::discount"});
  CHECK(pick({"pricing::discount"}) == V{"main::pricing::discount", "other::pricing::discount"});
  CHECK(pick({"pricing::*"}) == V{"main::pricing::discount", "other::pricing::discount", "<main::pricing::Order>::total",
                                  "main::pricing::generic::<u8>", "main::pricing::discount_vip"});
  CHECK(pick({"main::pricing::Order::total"}) == V{"<main::pricing::Order>::total"});
  CHECK(pick({"<main::pricing::Order>::total"}) == V{"<main::pricing::Order>::total"});
  CHECK(pick({"main::pricing::generic"}) == V{"main::pricing::generic::<u8>"});
  CHECK(pick({"main::util::*"}) == V{"main::util::round"});
  CHECK(pick({"_ZN4main7pricing8discount17h0ab45471d63b9820E"}) == V{"main::pricing::discount"});
  CHECK(pick({"_RNv*8discount"}) == V{"other::pricing::discount"});
  CHECK_FALSE(symbols__select(table, {"main::pricing::discoun"}));
}

TEST_CASE("table names are cut with an ellipsis at the width") {
  CHECK(symbols__shorten("short", 10) == "short");
  CHECK(symbols__shorten("exactly10!", 10) == "exactly10!");
  CHECK(symbols__shorten("eleven char", 10) == "eleven ch\u2026");
  CHECK(symbols__shorten("caf\xc3\xa9s and more", 5) == "caf\xc3\xa9\u2026");  // columns, not bytes
}
