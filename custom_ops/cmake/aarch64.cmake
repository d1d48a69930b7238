# Cross toolchain for aarch64 Linux (Debian's g++-aarch64-linux-gnu), e.g.
#   cmake -S custom_ops -B build/custom_ops-aarch64 -DCMAKE_TOOLCHAIN_FILE=custom_ops/cmake/aarch64.cmake \
#         -DLLMFOLD_STATIC_TESTS=ON
# Static test binaries run directly under qemu-aarch64-static; ctest uses the emulator below
# (LLMFOLD_QEMU_CPU=max has dotprod + i8mm, cortex-a72 has neither).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(LLMFOLD_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "Cross compiler prefix")
set(CMAKE_C_COMPILER ${LLMFOLD_CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${LLMFOLD_CROSS_PREFIX}g++)

# Baseline ARMv8.0: everything outside kernels/arm/{dotprod,i8mm}.cpp must run on a Cortex-A72.
set(CMAKE_C_FLAGS_INIT "-march=armv8-a")
set(CMAKE_CXX_FLAGS_INIT "-march=armv8-a")

set(LLMFOLD_AARCH64_SYSROOT "/usr/aarch64-linux-gnu" CACHE PATH "Target libraries (for qemu -L)")
set(CMAKE_FIND_ROOT_PATH ${LLMFOLD_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(LLMFOLD_QEMU_CPU "max" CACHE STRING "qemu -cpu for ctest runs")
find_program(LLMFOLD_QEMU qemu-aarch64-static)
if(LLMFOLD_QEMU)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${LLMFOLD_QEMU} -L ${LLMFOLD_AARCH64_SYSROOT} -cpu ${LLMFOLD_QEMU_CPU})
endif()
