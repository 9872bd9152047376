"""Checks on an onnxruntime-genai folder from a stranger before onnxruntime or onnx sees it, as EdgeftError.

The checks themselves live in edgeft/device/bundle_checks.py, the module every bundle ships, so the host
(`edgeft check`, bench, verify), the device script and the examples refuse the same folders: every file
genai_config.json names and every external-data location stays inside the folder, and no native library is
loaded unless the user asked (ref: CVE-2022-25882, CVE-2024-27318 — ONNX external-data path traversal).
"""

from __future__ import annotations

from pathlib import Path

from edgeft.device import bundle_checks
from edgeft.errors import EdgeftError


def check_external_data(model_path: Path, root: Path | None = None) -> list[Path]:
    """Refuse an ONNX model whose external-data locations leave `root` (default: the model's directory); the
    resolved data files it uses."""
    model_path = Path(model_path)
    root = Path(root if root is not None else model_path.parent).resolve()
    try:
        found = bundle_checks.external_data_locations(model_path)
    except bundle_checks.FolderError as e:
        raise EdgeftError(str(e)) from None
    files: set[Path] = set()
    for tensor, location in found:
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise EdgeftError(
                f"{model_path}: tensor '{tensor}' has external data at '{location}', outside {root}; "
                "refusing to load it"
            )
        files.add(target)
    return sorted(files)


def check_onnx_folder(folder: Path, *, allow_native_libs: bool = False) -> None:
    """An onnxruntime-genai folder may only point inside itself, and names no native library unless allowed
    (`--allow-native-libs`): every file its genai_config.json names, and every external-data location."""
    try:
        bundle_checks.check_onnx_folder(Path(folder), allow_native_libs=allow_native_libs)
    except bundle_checks.FolderError as e:
        raise EdgeftError(str(e)) from None
