# The install test: installs the softce build into a fresh temporary prefix, then
# configures, builds and runs tests/consumer (a separate project using
# find_package(softce)) against that prefix only, and checks the example's output
# (values computed with PyTorch in float64, printed to 4 decimals).
#
# Run as: cmake -DSOFTCE_BUILD_DIR=... -DCONSUMER_SOURCE_DIR=... -DWORK_DIR=... -DGENERATOR=...
#               -DCXX_COMPILER=... [-DBUILD_TYPE=...] [-DCXX_FLAGS=...] -P install_consumer.cmake
cmake_minimum_required(VERSION 3.25)

foreach(var SOFTCE_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "install_consumer.cmake: ${var} is not set")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")

function(run step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${step} failed (${rc}):\n${out}\n${err}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

set(config_args "")
if(BUILD_TYPE)
  set(config_args --config "${BUILD_TYPE}")
endif()
run("cmake --install" "${CMAKE_COMMAND}" --install "${SOFTCE_BUILD_DIR}" --prefix "${prefix}" ${config_args})

file(GLOB_RECURSE config_files "${prefix}/*/softce-config.cmake")
if(NOT config_files)
  message(FATAL_ERROR "no softce-config.cmake installed under ${prefix}")
endif()
if(NOT EXISTS "${prefix}/include/softce/softce.hpp")
  message(FATAL_ERROR "include/softce/softce.hpp was not installed under ${prefix}")
endif()

run("configure the consumer" "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${build}" -G "${GENERATOR}"
    "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
    "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)

# find_package must have found the installed package, not a build tree or another copy.
file(STRINGS "${build}/CMakeCache.txt" softce_dir REGEX "^softce_DIR:")
string(REGEX REPLACE "^softce_DIR:[A-Z]*=" "" softce_dir "${softce_dir}")
string(FIND "${softce_dir}" "${prefix}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "find_package(softce) used ${softce_dir}, not the package installed in ${prefix}")
endif()

run("build the consumer" "${CMAKE_COMMAND}" --build "${build}" ${config_args})

set(example "${build}/example")
if(NOT EXISTS "${example}" AND BUILD_TYPE)
  set(example "${build}/${BUILD_TYPE}/example")
endif()
run("run the example" "${example}")

file(READ "${CONSUMER_SOURCE_DIR}/expected_output.txt" expected)
if(NOT step_output STREQUAL expected)
  message(FATAL_ERROR "the example printed:\n${step_output}\nexpected:\n${expected}")
endif()
message(STATUS "consumer example built against ${softce_dir} and ran:\n${step_output}")
