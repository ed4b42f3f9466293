"""cuda_objects: compiles .cu files with nvcc into position-independent objects.

The objects go into the `srcs` of a cc_library or cc_binary like any precompiled object. Include
paths, defines and headers come from `deps` (cc_library targets), so the same header libraries
serve the host compiler and nvcc. nvcc drives the C++ toolchain's compiler (-ccbin).
"""

load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")

# The flags of the pip build (CMakeLists.txt) for Release, kept in step with it.
CUDA_COPTS = [
    "-std=c++17",
    "-O3",
    "-DNDEBUG",
    "-gencode=arch=compute_90a,code=sm_90a",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "-Xptxas=-v,--warn-on-spills",
    "-lineinfo",
]

def _cuda_objects_impl(ctx):
    cc_toolchain = find_cpp_toolchain(ctx)
    compilation = cc_common.merge_cc_infos(cc_infos = [d[CcInfo] for d in ctx.attr.deps]).compilation_context
    flags = ["-ccbin", cc_toolchain.compiler_executable, "-Xcompiler=-fPIC,-fvisibility=hidden"]
    flags += ctx.attr.copts
    flags += ["-D" + d for d in compilation.defines.to_list() + ctx.attr.defines]
    flags += ["-I" + i for i in compilation.quote_includes.to_list() + compilation.includes.to_list()]
    for include in compilation.system_includes.to_list():
        flags += ["-isystem", include]
    headers = depset(ctx.files.hdrs, transitive = [compilation.headers])

    objects = []
    for src in ctx.files.srcs:
        stem = src.short_path[:-len(src.extension) - 1].replace("../", "external/")
        obj = ctx.actions.declare_file("_cuda_objs/%s/%s.pic.o" % (ctx.label.name, stem))
        args = ctx.actions.args()
        args.add_all(flags)
        args.add("-c", src)
        args.add("-o", obj)
        ctx.actions.run(
            executable = ctx.attr.nvcc,
            arguments = [args],
            inputs = depset([src], transitive = [headers]),
            outputs = [obj],
            mnemonic = "NvccCompile",
            progress_message = "nvcc %s" % src.short_path,
            use_default_shell_env = True,
        )
        objects.append(obj)
    return [DefaultInfo(files = depset(objects))]

cuda_objects = rule(
    implementation = _cuda_objects_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"], doc = "CUDA sources, one object each."),
        "hdrs": attr.label_list(allow_files = True, doc = "Headers the sources include."),
        "deps": attr.label_list(providers = [CcInfo], doc = "cc_library targets for includes and defines."),
        "copts": attr.string_list(default = CUDA_COPTS, doc = "nvcc flags."),
        "defines": attr.string_list(doc = "Extra -D definitions."),
        "nvcc": attr.string(mandatory = True, doc = "Absolute path of nvcc (from @jfm_cuda//:defs.bzl)."),
        "_cc_toolchain": attr.label(default = Label("@bazel_tools//tools/cpp:current_cc_toolchain")),
    },
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
    fragments = ["cpp"],
)
