// Empty: the translation unit that builds the precompiled LibTorch header the shared libraries reuse.
