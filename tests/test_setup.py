"""The README's set-up holds on a fresh machine: every package the code and the tests import is in a
requirements file, at the version the tests pass with, and the install lines take the right torch.
(That the lines work is `.ci/run`'s job: a fresh virtual environment that installs only them.)"""
import ast
import importlib.metadata as md
import os
import re
import sys

from tests.test_train import ROOT

REQUIREMENTS = ("requirements.txt", "requirements-test.txt")
# Imported only inside a guard, never needed by a command or a test: why each is not a requirement.
OPTIONAL = {"fla": "bench/gpu.py and bench/wkv6.py time flash-linear-attention when it is installed",
            "wandb": "train.py --logger wandb says to pip install it"}


def python_files():
    for root, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", "out", "__pycache__", ".pytest_cache")]
        yield from (os.path.join(root, f) for f in files if f.endswith(".py"))


def imported_modules():
    """{top-level module: a file importing it} of every import, and every tests.runtimes.require("module")."""
    found = {}
    for path in python_files():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            for name in names:
                found.setdefault(name.split(".")[0], os.path.relpath(path, ROOT))
    return found


def local_modules():
    names = {"src", "tests", "bench", "scripts", "cuda"}
    for d in (ROOT, os.path.join(ROOT, "bench"), os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests")):
        names |= {f[:-3] for f in os.listdir(d) if f.endswith(".py")}
    return names


def requirement_lines():
    for name in REQUIREMENTS:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line and not line.startswith("-r"):
                    yield name, line


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def listed():
    """The distributions the requirements files name, and those they depend on (pip installs both)."""
    names = {canonical(re.split(r"[=<>!~\[ ;]", line, 1)[0]) for _, line in requirement_lines()}
    deps = set()
    for name in names:
        try:
            deps |= {canonical(re.split(r"[=<>!~\[ ;(]", r, 1)[0]) for r in md.requires(name) or ()}
        except md.PackageNotFoundError:
            pass
    return names, names | deps


def test_every_imported_package_is_in_a_requirements_file():
    """A fresh environment made from the README's lines has every import of every command and test."""
    named, installed = listed()
    by_module = md.packages_distributions()
    stdlib, local = sys.stdlib_module_names, local_modules()
    missing = []
    for module, where in sorted(imported_modules().items()):
        if module in stdlib or module in local or module in OPTIONAL:
            continue
        if module in by_module:
            ok = {canonical(d) for d in by_module[module]} & installed
        else:       # not installed here: a named distribution whose name starts with the module's
            ok = any(name.startswith(canonical(module)) for name in named)
        if not ok:
            missing.append(f"{module} (imported by {where})")
    assert not missing, f"imported but in no requirements file: {missing}"
    assert "hypothesis" in named and "web-rwkv-py" in named and "llama-cpp-python" in named


def test_every_requirement_is_pinned_to_the_tested_version():
    loose = [f"{name}: {line}" for name, line in requirement_lines() if "==" not in line]
    assert not loose, f"not pinned: {loose}"


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def pinned_torch():
    return next(line.split("==")[1] for _, line in requirement_lines() if line.startswith("torch=="))


def test_the_readme_install_lines_take_the_right_torch():
    """CPU-only: PyTorch's CPU index, at requirements.txt's version (PyPI's is the CUDA build); GPU:
    requirements.txt alone; the test line adds requirements-test.txt."""
    text = readme()
    cpu = [line for line in text.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert cpu == [f"pip install torch=={pinned_torch()} --index-url https://download.pytorch.org/whl/cpu "
                   "&& pip install -r requirements.txt"], cpu
    assert re.search(r"GPU.*\n\n```sh\npip install -r requirements.txt\n```", text), "no GPU install line"
    tests = [line for line in text.splitlines() if "python -m pytest" in line]
    assert len(tests) == 1 and "pip install -r requirements-test.txt" in tests[0], tests


def test_ci_runs_the_readme_lines_in_a_fresh_environment():
    """.ci/run reads its install and test commands out of README.md (so a step the README lacks fails
    CI) and runs them in a virtual environment it makes itself."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert 'readme_line "--index-url https://download.pytorch.org/whl/cpu"' in ci
    assert 'readme_line "python -m pytest"' in ci
    assert re.search(r"python3 -m venv \"\$VENV\"\n\. \"\$VENV/bin/activate\"", ci)
    assert "pip install" not in ci.replace("pip install -r", "")   # no install of its own besides the README's


def test_ci_runs_the_numerical_tests_again_on_other_code_paths():
    """Every numerical bound must hold on the code paths other machines take, not only this CPU's:
    .ci/run runs the tests marked numerical again under MKL's AVX2 and COMPATIBLE paths and on one
    thread; the marker is registered, and it marks the tests that failed on another CPU before."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "for setting in MKL_CBWR=AVX2 MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1; do" in ci
    assert 'env "$setting" python -m pytest -q -m numerical $NUMERICAL' in ci
    with open(os.path.join(ROOT, "pytest.ini"), encoding="utf-8") as f:
        assert "numerical:" in f.read()
    for name, marked in (("test_export_lora", "@pytest.mark.numerical\ndef test_the_file_is_what_llama_cpp_reads"),
                         ("test_long_context", "pytest.param(torch.float32, False, marks=pytest.mark.numerical)"),
                         ("test_web_rwkv", "@pytest.mark.numerical\ndef test_st_export_in_web_rwkv_is_the_rwkv_package")):
        with open(os.path.join(ROOT, "tests", name + ".py"), encoding="utf-8") as f:
            assert marked in f.read(), name
