"""Create the project's virtual environment from the Python that runs this script.

Run as ``PYTHON scripts/setup_venv.py VENV [REQUIREMENTS_FILE ...]`` (``make setup`` does).

1. Creates ``VENV`` with ``--system-site-packages`` from ``PYTHON``.
2. When ``PYTHON`` is itself a virtual environment (the usual GPU machine, where
   ``python3`` is a venv's interpreter holding a CUDA torch) or has a user site, a
   ``--system-site-packages`` venv would not see those packages, only the base
   interpreter's. A ``.pth`` file in ``VENV`` adds ``PYTHON``'s own site directories after
   ``VENV``'s, so ``VENV`` imports the same torch as ``PYTHON`` and pip counts it as
   installed. Nothing is installed into ``PYTHON``'s environment. (A conda environment's
   interpreter is not a venv: its site-packages are the system site packages already.)
3. Installs ``torch==2.13.0`` (the CPU build) into ``VENV`` only when no torch is
   importable there; failing that is an error, nothing works without torch.
4. Installs the build tools and the requirements files' packages that ``VENV`` lacks,
   with the torch found in step 3 as a constraint: a package that would need another
   torch (a multi-GB download) is not installed rather than replacing it. When that fails
   (no network, or no version compatible with that torch), it warns and goes on: the
   tests that need a missing optional package skip themselves.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

FALLBACK_TORCH = "torch==2.13.0"
# What `pip install --no-build-isolation` needs in the environment that builds: setuptools
# with PEP 660 editable installs and the bdist_wheel command it runs (built in from 70.1;
# older setuptools get it from the `wheel` package), and ninja for a parallel build.
BUILD_TOOLS = ["setuptools>=70.1", "ninja"]
LINK_PTH = "_regfuse_parent_env.pth"

# Runs inside VENV: prints the requirements it lacks, one a line.
MISSING_SCRIPT = r"""
import shutil, sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for line in sys.argv[1:]:
    req = Requirement(line)
    if req.name == "ninja" and shutil.which("ninja"):
        continue  # a ninja on PATH does the same job
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        print(line)
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        print(line)
"""


def log(message: str) -> None:
    print(f"setup_venv: {message}", flush=True)


def venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def parent_site_dirs() -> list[str]:
    """This interpreter's site directories that a --system-site-packages venv misses."""
    base = Path(sys.base_prefix).resolve()
    dirs = []
    if sys.prefix != sys.base_prefix:  # a virtual environment: its own site-packages
        dirs += [d for d in site.getsitepackages() if base not in Path(d).resolve().parents]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())  # `pip install --user` packages
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def run_in(env: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv_python(env)), *args], text=True, **kwargs)


def create(env: Path) -> None:
    if venv_python(env).exists():
        check = run_in(env, "-c", "import sys; print('%d.%d' % sys.version_info[:2])",
                       capture_output=True)
        have = check.stdout.strip()
        want = "%d.%d" % sys.version_info[:2]
        if check.returncode != 0 or have != want:
            sys.exit(f"setup_venv: {env} holds Python {have or '?'}, {sys.executable} is {want}: "
                     f"remove {env} (make clean) and run again")
        return
    # Without a pip of its own when this interpreter has one, which env then runs through
    # the link: ensurepip would also put its bundled setuptools (65 on Python 3.11) first
    # on env's path, in front of a newer one the parent environment holds.
    has_pip = importlib.util.find_spec("pip") is not None
    log(f"creating {env} from {sys.executable} (Python {sys.version.split()[0]})")
    venv.EnvBuilder(system_site_packages=True, with_pip=not has_pip).create(env)


def link(env: Path) -> None:
    """(Re)write the .pth that shows this interpreter's own site directories to ``env``."""
    purelib = run_in(env, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     capture_output=True, check=True).stdout.strip()
    pth = Path(purelib) / LINK_PTH
    dirs = parent_site_dirs()
    if not dirs:
        pth.unlink(missing_ok=True)
        return
    # addsitedir (not a bare path line) so that the .pth files in those directories run
    # too: editable installs and other path hooks of the parent environment keep working.
    pth.write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    log(f"{env} sees the packages of {sys.prefix} ({', '.join(dirs)})")


def torch_location(env: Path) -> str | None:
    found = run_in(env, "-c", "import torch; print(torch.__version__, torch.__file__)",
                   capture_output=True)
    return found.stdout.strip() if found.returncode == 0 else None


def pip_install(env: Path, requirements: list[str], constraints: Path | None = None) -> bool:
    log("installing " + " ".join(requirements))
    pinned = ["-c", str(constraints)] if constraints is not None else []
    return run_in(env, "-m", "pip", "install", "-q", *pinned, *requirements).returncode == 0


def torch_constraint(env: Path, version: str) -> Path:
    """A pip constraints file in ``env`` holding torch at ``version``, the installed one."""
    path = env / "torch-constraint.txt"
    path.write_text(f"torch=={version}\n")
    return path


def missing(env: Path, requirements: list[str]) -> list[str]:
    if not requirements:
        return []
    found = run_in(env, "-c", MISSING_SCRIPT, *requirements, capture_output=True)
    if found.returncode != 0:
        log(f"could not check what is installed ({found.stderr.strip()}); installing everything")
        return requirements
    return found.stdout.split()


def read_requirements(path: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


def main(argv: list[str]) -> int:
    if not argv:
        sys.exit(__doc__)
    env = Path(argv[0]).absolute()
    create(env)
    link(env)

    torch_found = torch_location(env)
    if torch_found is None:
        log(f"no torch importable by {sys.executable}: installing {FALLBACK_TORCH} into {env}")
        torch_found = torch_location(env) if pip_install(env, [FALLBACK_TORCH]) else None
        if torch_found is None:
            log(f"error: could not install {FALLBACK_TORCH}")
            return 1
    log(f"torch {torch_found}")

    wanted = BUILD_TOOLS + [r for path in argv[1:] for r in read_requirements(path)]
    lacking = missing(env, wanted)
    keep_torch = torch_constraint(env, torch_found.split()[0]) if lacking else None
    if lacking and not pip_install(env, lacking, keep_torch):
        # One at a time, so that one unavailable package costs only itself.
        failed = [r for r in lacking if not pip_install(env, [r], keep_torch)]
        if failed:
            log("warning: could not install " + " ".join(failed) + "; going on without them "
                "(tests that need them are skipped; the build needs setuptools>=64 with wheel, "
                "and is serial without ninja)")
    if shutil.which("ninja") is None and not (venv_python(env).parent / "ninja").exists():
        log("note: no ninja, the extension builds one file at a time (MAX_JOBS has no effect)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
