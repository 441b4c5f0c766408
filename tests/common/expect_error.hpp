// Shared test helper: run `fn`, expect a peftfw::InputError whose message contains every fragment.
#pragma once

#include <gtest/gtest.h>

#include <exception>
#include <functional>
#include <string>
#include <vector>

#include "peftfw/error.hpp"

namespace peftfw::testing {

inline void expect_input_error(const std::function<void()>& fn,
                               const std::vector<std::string>& fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected InputError, nothing was thrown";
  } catch (const InputError& e) {
    const std::string message = e.what();
    for (const auto& f : fragments) {
      EXPECT_NE(message.find(f), std::string::npos)
          << "message lacks \"" << f << "\"\nmessage: " << message;
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected InputError, got another exception: " << e.what();
  }
}

}  // namespace peftfw::testing
