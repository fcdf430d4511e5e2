"""The images of the docker clusters: a base image and tidelog's image on top of it.

The Dockerfile's default base is the official Python slim image. Where it is neither
present nor pullable (no registry reachable), ``ensure_base_image`` makes a Debian base
with ``debootstrap --variant=minbase`` (python3 and its venv module included) and
``docker import``. ``build_image`` builds ``docker/Dockerfile`` with no network: the
wheels of tidelog's dependencies are built on the host (``pip wheel``) and sent in the
build context, which is a copy of the source tree made in a temporary folder (so nothing
is written into the repository).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

import attrs

from tools.docker.engine import Engine, EngineError

__all__ = [
    "BUILD_STAGE_IMAGE",
    "DEFAULT_BASE_IMAGE",
    "DEFAULT_IMAGE",
    "LOCAL_BASE_IMAGE",
    "BuildResult",
    "build_image",
    "build_wheels",
    "debian_mirror",
    "ensure_base_image",
    "image_exists",
    "image_size_bytes",
    "repository_root",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_IMAGE = "python:3.11-slim"
LOCAL_BASE_IMAGE = "tidelog-base:bookworm"
DEFAULT_IMAGE = "tidelog:dev"
BUILD_STAGE_IMAGE = "tidelog-build-stage:cache"
"""The Dockerfile's build stage, kept tagged as the cache of the next build."""
_SOURCE_PARTS = (
    "pyproject.toml",
    "README.md",
    "storage",
    "replication",
    "cluster",
    "tools",
    "docker",
)
_DEFAULT_MIRROR = "http://deb.debian.org/debian"


@attrs.frozen
class BuildResult:
    """An image that was built: its tag, id, size and how long the build took."""

    tag: str
    image_id: str
    size_bytes: int
    build_s: float
    base_image: str


def repository_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _docker(
    engine: Engine, *args: str, timeout_s: float = 600.0, stdin: bytes | None = None
) -> str:
    done = subprocess.run(
        ["docker", *args],
        capture_output=True,
        env=engine.env,
        timeout=timeout_s,
        input=stdin,
        check=False,
    )
    if done.returncode != 0:
        raise EngineError(
            f"`docker {' '.join(args)}` failed with exit code {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()[-3000:]}"
        )
    return done.stdout.decode(errors="replace")


def image_exists(engine: Engine, image: str) -> bool:
    done = subprocess.run(
        ["docker", "image", "inspect", image],
        capture_output=True,
        env=engine.env,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


def image_size_bytes(engine: Engine, image: str) -> int:
    return int(_docker(engine, "image", "inspect", "--format", "{{.Size}}", image).strip())


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host (``TIDELOG_DOCKER_DEBIAN_MIRROR`` wins),
    so debootstrap reaches the same place apt does."""
    override = os.environ.get("TIDELOG_DOCKER_DEBIAN_MIRROR")
    if override:
        return override
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for pattern in (r"^URIs:\s*(\S+/debian)\s*$", r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)\s"):
            match = re.search(pattern, text, re.MULTILINE)
            if match:
                return match.group(1)
    return _DEFAULT_MIRROR


def ensure_base_image(engine: Engine, wanted: str = DEFAULT_BASE_IMAGE) -> str:
    """``wanted`` when it is here or can be pulled; else the debootstrap base (made once)."""
    if image_exists(engine, wanted):
        return wanted
    pulled = subprocess.run(
        ["docker", "pull", wanted], capture_output=True, env=engine.env, timeout=300, check=False
    )
    if pulled.returncode == 0:
        return wanted
    log.info("base_pull_failed image=%s using=%s", wanted, LOCAL_BASE_IMAGE)
    if not image_exists(engine, LOCAL_BASE_IMAGE):
        make_debootstrap_base(engine, LOCAL_BASE_IMAGE)
    return LOCAL_BASE_IMAGE


def make_debootstrap_base(engine: Engine, tag: str, suite: str = "bookworm") -> None:
    """A minimal Debian with python3 and python3-venv, imported as image ``tag``."""
    if not shutil.which("debootstrap"):
        subprocess.run(
            ["apt-get", "install", "-y", "debootstrap"],
            capture_output=True,
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=600,
        )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tidelog-rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        argv = [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv",
            suite,
            str(rootfs),
            debian_mirror(),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
        if done.returncode != 0:
            raise EngineError(f"`{' '.join(argv)}` failed: {(done.stdout + done.stderr)[-3000:]}")
        _slim_rootfs(rootfs)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        imported = subprocess.run(
            ["docker", "import", "--change", 'CMD ["/bin/bash"]', "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            env=engine.env,
            timeout=600,
            check=False,
        )
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise EngineError(
                f"docker import of {rootfs} failed: {imported.stderr.decode()[-2000:]}"
            )
    log.info("base_made image=%s took_s=%.1f", tag, time.monotonic() - started)


def _slim_rootfs(rootfs: Path) -> None:
    """Drop what a container never reads (about 50 MB): downloaded packages, apt lists,
    manuals, translations and docs (each package's copyright file stays)."""
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / leftover).glob("*"):
            if entry.is_file():
                entry.unlink()
    for folder in ("usr/share/man", "usr/share/locale", "usr/share/info"):
        shutil.rmtree(rootfs / folder, ignore_errors=True)
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    for entry in sorted((rootfs / "usr/share/doc").rglob("*"), reverse=True):
        if entry.is_symlink() or entry.is_file():
            if entry.name != "copyright":
                entry.unlink()
        elif entry.is_dir() and not any(entry.iterdir()):
            entry.rmdir()


def build_wheels(dest: Path, root: Path | None = None, cache: Path | None = None) -> list[Path]:
    """Wheels of tidelog's dependencies (and the build backend) for a build with no
    network, built or downloaded on the host by pip. With ``cache``, they are kept there
    under a key of the dependency list and this python, and copied from there next time."""
    root = root or repository_root()
    dest.mkdir(parents=True, exist_ok=True)
    if cache is None:
        return _pip_wheels(dest, root)
    key = _wheels_key(root)
    folder = cache / key
    if not folder.exists():
        scratch = cache / f".{key}-{os.getpid()}"  # renamed when complete: never half a set
        shutil.rmtree(scratch, ignore_errors=True)
        _pip_wheels(scratch, root)
        try:
            scratch.rename(folder)
        except OSError:  # another build put the same set there first
            shutil.rmtree(scratch, ignore_errors=True)
    for wheel in folder.glob("*.whl"):
        shutil.copy2(wheel, dest / wheel.name)
    return sorted(dest.glob("*.whl"))


def _wheels_key(root: Path) -> str:
    with open(root / "pyproject.toml", "rb") as source:
        project = tomllib.load(source)
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    text = "\n".join([sys.version, platform.machine(), *sorted(wanted)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pip_wheels(dest: Path, root: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--wheel-dir",
        str(dest),
        str(root),
        "setuptools>=77",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode != 0:
        raise EngineError(f"pip wheel failed: {done.stderr.strip()[-3000:]}")
    for own in dest.glob("tidelog-*.whl"):
        own.unlink()  # the image builds tidelog's own wheel from the source it is sent
    return sorted(dest.glob("*.whl"))


def _copy_sources(root: Path, context: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "wheels", ".mypy_cache")
    for part in _SOURCE_PARTS:
        source = root / part
        if source.is_dir():
            shutil.copytree(source, context / part, ignore=ignore)
        else:
            shutil.copy2(source, context / part)


def build_image(
    engine: Engine,
    tag: str = DEFAULT_IMAGE,
    base_image: str | None = None,
    no_cache: bool = False,
    root: Path | None = None,
    extra_args: Sequence[str] = (),
) -> BuildResult:
    """Build ``docker/Dockerfile`` as ``tag`` on ``base_image`` (default: the official
    Python slim image, or the debootstrap base where that cannot be pulled)."""
    root = root or repository_root()
    base = base_image or ensure_base_image(engine)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tidelog-build-") as scratch:
        context = Path(scratch)
        _copy_sources(root, context)
        build_wheels(
            context / "docker" / "wheels", root, cache=engine.settings.state_dir / "wheels"
        )
        env = dict(engine.env)
        env.setdefault("DOCKER_BUILDKIT", "0")  # the classic builder: no buildx plugin needed
        argv = [
            "docker",
            "build",
            "--network",
            "none",
            "--file",
            str(context / "docker" / "Dockerfile"),
            "--build-arg",
            f"BASE_IMAGE={base}",
            *(["--no-cache"] if no_cache else []),
            *extra_args,
        ]
        # The build stage first, tagged, so its layers (the dependencies' above all) stay
        # as the cache of the next build; then the image, which reuses them.
        for target in (["--target", "build", "--tag", BUILD_STAGE_IMAGE], ["--tag", tag]):
            done = subprocess.run(
                [*argv, *target, str(context)],
                capture_output=True,
                text=True,
                env=env,
                timeout=1800,
                check=False,
            )
            if done.returncode != 0:
                raise EngineError(
                    f"docker build failed with exit code {done.returncode}: "
                    f"{(done.stdout + done.stderr).strip()[-4000:]}"
                )
    # Earlier build stages and images (untagged now: their tags moved to the new ones)
    # and the requirements stage: drop them.
    for stage in ("build", "image"):
        _docker(
            engine,
            "image",
            "prune",
            "--force",
            "--filter",
            f"label=org.tidelog.stage={stage}",
            "--filter",
            "dangling=true",
        )
    image_id = _docker(engine, "image", "inspect", "--format", "{{.Id}}", tag).strip()
    result = BuildResult(
        tag=tag,
        image_id=image_id,
        size_bytes=image_size_bytes(engine, tag),
        build_s=time.monotonic() - started,
        base_image=base,
    )
    log.info(
        "image_built tag=%s size_bytes=%d took_s=%.1f base=%s",
        tag,
        result.size_bytes,
        result.build_s,
        base,
    )
    return result
