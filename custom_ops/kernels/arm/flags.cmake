# Per-file -march flags of the ARM kernels (included by custom_ops/CMakeLists.txt on aarch64).
# Only dotprod.cpp / i8mm.cpp may contain ARMv8.2+ instructions; dispatch runs them only when
# getauxval reports HWCAP_ASIMDDP / HWCAP2_I8MM. Everything else stays ARMv8.0 (Cortex-A72).
foreach(f ${ARM_SOURCES})
  get_filename_component(n ${f} NAME_WE)
  if(n STREQUAL "i8mm")
    set_source_files_properties(${f} PROPERTIES COMPILE_OPTIONS "-march=armv8.2-a+dotprod+i8mm")
  elseif(n STREQUAL "dotprod")
    set_source_files_properties(${f} PROPERTIES COMPILE_OPTIONS "-march=armv8.2-a+dotprod")
  else()
    set_source_files_properties(${f} PROPERTIES COMPILE_OPTIONS "-march=armv8-a")
  endif()
endforeach()
