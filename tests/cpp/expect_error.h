#pragma once

// A check shared by the C++ test files.

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>

namespace attnpool_test {

// Runs f and checks it throws a c10::Error whose message contains `expected`.
inline void expect_error(const std::function<void()>& f, const std::string& expected) {
  try {
    f();
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos)
        << "message \"" << e.what() << "\" lacks \"" << expected << "\"";
    return;
  }
  ADD_FAILURE() << "no error; expected one containing \"" << expected << "\"";
}

}  // namespace attnpool_test
