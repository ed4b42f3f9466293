"""pytest_suite: one py_test per test file, each running pytest on that file.

The runner (bazel/pytest_runner.py) first proves that `jax_flashmla` and its extension are imported
from the test's runfiles (the Bazel build), not from the source tree or site-packages.
"""

def pytest_suite(name, srcs, data = [], deps = [], size = "large", tags = [], **kwargs):
    """Declares <file without .py> py_tests and a test_suite `name` holding them all.

    Nothing is declared for an empty `srcs` but the (empty) test_suite.
    """
    tests = []
    for src in srcs:
        test_name = src[:-len(".py")]
        native.py_test(
            name = test_name,
            size = size,
            srcs = [Label("//bazel:pytest_runner.py"), src],
            main = Label("//bazel:pytest_runner.py"),
            args = ["$(rootpath %s)" % src],
            data = data,
            deps = deps,
            python_version = "PY3",
            tags = tags,
            **kwargs
        )
        tests.append(":" + test_name)
    native.test_suite(name = name, tests = tests, tags = tags)
