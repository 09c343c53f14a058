// A minimal test harness: TEST(name) registers a function, CHECK records failures.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace pgtest {

struct test_case {
  const char* name;
  std::function<void()> fn;
};

std::vector<test_case>& registry();
void fail(const char* file, int line, const std::string& what);

struct registrar {
  registrar(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

}  // namespace pgtest

#define PG_CAT2(a, b) a##b
#define PG_CAT(a, b) PG_CAT2(a, b)
#define TEST(name)                                                          \
  static void name();                                                       \
  static ::pgtest::registrar PG_CAT(reg_, name)(#name, name);               \
  static void name()

#define CHECK(cond)                                            \
  do {                                                         \
    if (!(cond)) ::pgtest::fail(__FILE__, __LINE__, #cond);    \
  } while (0)

#define CHECK_OK(expr)                                                                 \
  do {                                                                                 \
    ::pregated::status _st = (expr);                                                   \
    if (!_st.is_ok()) ::pgtest::fail(__FILE__, __LINE__, #expr ": " + _st.message()); \
  } while (0)

#define CHECK_ERR(expr, needle)                                                               \
  do {                                                                                        \
    ::pregated::status _st = (expr);                                                          \
    if (_st.is_ok()) ::pgtest::fail(__FILE__, __LINE__, #expr " succeeded, expected an error"); \
    else if (_st.message().find(needle) == std::string::npos)                                 \
      ::pgtest::fail(__FILE__, __LINE__, #expr ": message lacks '" needle "': " + _st.message()); \
  } while (0)
