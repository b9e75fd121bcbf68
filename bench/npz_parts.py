"""Split an .npz file into parts small enough to carry, and join them again, losslessly.

    python bench/npz_parts.py split SRC.npz DIR --parts 3   # DIR/part1.npz ... DIR/part3.npz
    python bench/npz_parts.py join DIR OUT.npz              # the same arrays as SRC.npz

The device tool carries at most 64 MiB a call, and CIFAR-10's lossless file is 140 MB, so
bench/gpu.sh sends it in parts over consecutive calls (a warm machine keeps what earlier calls
brought) and joins them there. Every array with rows is cut into ``--parts`` runs of rows (part k
holds the k-th run of each); arrays without rows go whole into part 1. Parts are LZMA-compressed zip
files, as numpy reads any .npz; ``join`` refuses a folder with a part missing, naming it, before it
writes anything.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path

import numpy as np

INDEX = "parts.json"  # which parts make the whole, written beside them


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_LZMA) as z:
        for key, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, allow_pickle=False)
            z.writestr(f"{key}.npy", buf.getvalue())


def split(src: Path, out: Path, parts: int) -> list[Path]:
    """``src``'s arrays cut into ``parts`` files ``out/part<k>.npz`` (row runs of each array)."""
    if parts < 1:
        raise SystemExit(f"--parts must be >= 1, got {parts}")
    if not src.is_file():
        raise SystemExit(f"{src}: no such file")
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    out.mkdir(parents=True, exist_ok=True)
    runs = {key: np.array_split(a, parts) if a.ndim else [a] for key, a in arrays.items()}  # a 0-d array: part 1 only
    paths = []
    for k in range(parts):
        chunk = {key: r[k] for key, r in runs.items() if k < len(r)}
        paths.append(out / f"part{k + 1}.npz")
        _write(paths[-1], chunk)
    (out / INDEX).write_text(json.dumps({"source": src.name, "parts": [p.name for p in paths], "keys": list(arrays)}))
    return paths


def join(folder: Path, out: Path) -> Path:
    """The arrays of ``folder``'s parts, rows in part order, saved (uncompressed) as ``out``."""
    index_path = folder / INDEX
    if not index_path.is_file():
        raise SystemExit(f"{index_path}: no such file (split the .npz with bench/npz_parts.py split first)")
    index = json.loads(index_path.read_text())
    missing = [name for name in index["parts"] if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"{folder}: part {', '.join(missing)} of {len(index['parts'])} is missing (carry it)")
    pieces: dict[str, list[np.ndarray]] = {key: [] for key in index["keys"]}
    for name in index["parts"]:
        with np.load(folder / name, allow_pickle=False) as f:
            for key in f.files:
                pieces[key].append(f[key])
    np.savez(out, **{key: (np.concatenate(p) if p[0].ndim else p[0]) for key, p in pieces.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("split", help="SRC.npz into DIR/part<k>.npz")
    s.add_argument("src", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--parts", type=int, default=3)
    j = sub.add_parser("join", help="DIR's parts into OUT.npz")
    j.add_argument("folder", type=Path)
    j.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    if args.verb == "split":
        for p in split(args.src, args.out, args.parts):
            print(f"{p}: {p.stat().st_size / 2**20:.1f} MiB")
    else:
        print(join(args.folder, args.out))


if __name__ == "__main__":
    main()
