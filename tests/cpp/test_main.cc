#include <atomic>
#include <cstring>
#include <mutex>

#include "harness.h"

namespace pgtest {

static std::atomic<int> failures{0};
static std::mutex print_mu;

std::vector<test_case>& registry() {
  static std::vector<test_case> r;
  return r;
}

void fail(const char* file, int line, const std::string& what) {
  std::lock_guard<std::mutex> lk(print_mu);
  std::fprintf(stderr, "  FAILED %s:%d: %s\n", file, line, what.c_str());
  ++failures;
}

}  // namespace pgtest

int main(int argc, char** argv) {
  int ran = 0, failed_tests = 0;
  for (const pgtest::test_case& t : pgtest::registry()) {
    if (argc > 1 && std::strstr(t.name, argv[1]) == nullptr) continue;
    const int before = pgtest::failures.load();
    std::printf("[ RUN  ] %s\n", t.name);
    std::fflush(stdout);
    t.fn();
    const bool ok = pgtest::failures.load() == before;
    std::printf("[ %s ] %s\n", ok ? " OK " : "FAIL", t.name);
    ++ran;
    failed_tests += ok ? 0 : 1;
  }
  std::printf("%d tests, %d failed\n", ran, failed_tests);
  return failed_tests == 0 && ran > 0 ? 0 : 1;
}
