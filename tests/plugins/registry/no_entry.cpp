// A valid shared library that is not a peftfw plugin (no entry point).
extern "C" __attribute__((visibility("default"))) int some_other_library_function(void) { return 42; }
