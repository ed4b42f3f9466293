"""jax_flashmla_dependencies(): every external repository the Bazel build needs, all local.

Call it from the WORKSPACE (ours, or yours when you depend on @jax_flashmla) and register the
Python toolchain it defines:

    load("@jax_flashmla//bazel:repositories.bzl", "jax_flashmla_dependencies")
    jax_flashmla_dependencies()
    register_toolchains("@jfm_python//:python_toolchain")
"""

load("//bazel:cuda_configure.bzl", "cuda_configure")
load("//bazel:python_configure.bzl", "python_configure")
load("//bazel:standins.bzl", "rules_standins")

def jax_flashmla_dependencies():
    rules_standins()
    if "jfm_python" not in native.existing_rules():
        python_configure(name = "jfm_python")
    if "jfm_cuda" not in native.existing_rules():
        cuda_configure(name = "jfm_cuda")
