"""Runs pytest on the files given as arguments, against the Bazel-built jax_flashmla.

Used by bazel/pytest.bzl. Before any test runs it checks where `jax_flashmla` and its compiled
`_ext` come from: both must sit in this test's runfiles, and the extension must resolve into
bazel-out, so a copy in the source tree or an installed wheel can never stand in for the build.
"""

import os
import sys

sys.dont_write_bytecode = True  # runfiles are Bazel's; keep __pycache__ out of them


def check_bazel_extension():
    """Returns the path of the extension in use; exits with a message if it is not Bazel's."""
    import jax_flashmla
    from jax_flashmla import _ext

    runfiles = os.path.realpath(os.environ.get("TEST_SRCDIR") or os.environ.get("RUNFILES_DIR") or "")
    if not runfiles:
        sys.exit("pytest_runner: run me with `bazel test` (no TEST_SRCDIR)")
    package_dir = os.path.dirname(os.path.abspath(jax_flashmla.__file__))
    ext_path = os.path.abspath(_ext.__file__)
    problems = []
    if not os.path.realpath(package_dir).startswith(runfiles) and not package_dir.startswith(runfiles):
        problems.append(f"jax_flashmla imported from {package_dir}, outside the runfiles {runfiles}")
    if os.path.dirname(ext_path) != package_dir:
        problems.append(f"_ext imported from {ext_path}, not beside the package in {package_dir}")
    if f"{os.sep}bazel-out{os.sep}" not in os.path.realpath(ext_path):
        problems.append(f"_ext resolves to {os.path.realpath(ext_path)}, which is not a Bazel output")
    if problems:
        sys.exit("pytest_runner: not testing the Bazel build:\n  " + "\n  ".join(problems))
    return os.path.realpath(ext_path)


def main(argv):
    import pytest

    ext = check_bazel_extension()
    print(f"pytest_runner: jax_flashmla._ext = {ext}", flush=True)
    # scripts/test.sh runs `python -m pytest` from tests/, so tests import their helpers
    # (`from conftest import ...`) as top-level modules: give them the same sys.path entry.
    for test_dir in sorted({os.path.dirname(os.path.abspath(a)) for a in argv if a.endswith(".py")}):
        sys.path.insert(0, test_dir)
    args = ["-p", "no:cacheprovider", "--rootdir", os.getcwd(), "-ra"]
    if os.path.exists("pyproject.toml"):
        args += ["-c", "pyproject.toml"]
    if os.environ.get("XML_OUTPUT_FILE"):
        args += ["--junitxml", os.environ["XML_OUTPUT_FILE"]]
    return pytest.main(args + argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
