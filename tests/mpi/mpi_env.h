#pragma once
#include "pardit/dist/runtime.h"

namespace pardit::test {
dist::Runtime& runtime();
}  // namespace pardit::test
