"""The documents agree with the repository: CI runs the README's command, and
nothing cites a document that the repository does not hold."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".git", ".venv", ".venv-peers", "runs", "__pycache__", ".hypothesis", "build", "dist"}
TEXT = (".py", ".md", ".cfg", ".toml", ".cc", ".json", ".txt", ".cff")


def _files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [
            d for d in dirs if d not in SKIP and not d.startswith(".venv") and not d.endswith(".egg-info")
        ]
        for name in files:
            if name.endswith(TEXT) or name == "run":
                yield os.path.join(folder, name)


def test_ci_runs_exactly_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1, ci
    assert f"    {ci[0]}\n" in readme, "the README's test command and .ci/run differ"
    assert "pytest" in ci[0] and "ruff check" in ci[0] and "ruff format --check" in ci[0]


def test_every_cited_document_is_in_the_repository():
    names = {n for p in _files() for n in os.listdir(os.path.dirname(p))}
    held = {os.path.relpath(p, ROOT) for p in _files()} | names
    missing = {}
    for path in _files():
        with open(path, errors="replace") as f:
            text = f.read()
        for cited in set(re.findall(r"\b(?:[\w./-]*/)?[A-Z][A-Za-z_-]*\.md\b|\bdocs/[\w-]+\.md\b", text)):
            if cited not in held and os.path.basename(cited) not in names:
                missing.setdefault(cited, []).append(os.path.relpath(path, ROOT))
        outside = "../" + "shared"  # spelled in two parts so that this file does not cite it
        assert outside not in text, f"{path} cites a folder outside the repository"
    assert not missing, f"documents cited but not in the repository: {missing}"
    for doc in (
        "docs/method.md",
        "docs/design.md",
        "LICENSE",
        "CITATION.cff",
        "CONTRIBUTING.md",
        "CHANGELOG.md",
    ):
        assert os.path.exists(os.path.join(ROOT, doc)), doc


def test_walkthrough_runs_as_written():
    """docs/walkthrough.md: every ``>>>`` line runs and prints what the page says."""
    import doctest  # noqa: PLC0415

    path = os.path.join(ROOT, "docs", "walkthrough.md")
    result = doctest.testfile(
        path,
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
    )
    assert result.attempted > 20, result
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in docs/walkthrough.md failed"


def test_docstring_examples_run():
    """The Example blocks of the public API's docstrings run and print what they show
    (they share one namespace, in this order, as a reader follows them)."""
    import doctest  # noqa: PLC0415

    import tfdq  # noqa: PLC0415

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    namespace = {}
    objects = [tfdq.quantize_model, tfdq.constrain]
    for obj in objects:
        tests = finder.find(obj, obj.__name__, globs=namespace)
        assert tests and tests[0].examples, f"{obj.__name__} has no Example block"
        for test in tests:
            test.globs = namespace  # shared: later examples use earlier names
            runner.run(test, clear_globs=False)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed"
